//! Harnesses shared by the conformance tests.
#![allow(dead_code, unreachable_pub)]

pub mod magento;
pub mod rdstation;
pub mod salesforce;
