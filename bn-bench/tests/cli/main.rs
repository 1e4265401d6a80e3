//! bn-bench's tests, as one test crate with a module per subject: the command line, the JSON
//! records, the layers it measures and the naive baseline's conformance.

mod cli_args;
mod json_schema;
mod layers;
mod naive_conformance;
