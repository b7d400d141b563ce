#![no_std]
//! Empty: the crate is built for its binary (the BPF object); this library
//! target only lets policy-agent list it as a build dependency.
