//! Harnesses shared by the conformance tests.
#![allow(dead_code, unreachable_pub)]

pub mod rdstation;
pub mod salesforce;
