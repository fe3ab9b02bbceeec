//! Harnesses shared by the conformance tests.
#![allow(dead_code, unreachable_pub)]

pub mod salesforce;
