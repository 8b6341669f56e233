//! Hostile inputs: see main.rs for which file holds which.
#[allow(unused_imports)]
use super::harness::*;
