//! HTTP plumbing shared by the API, the admin socket and the CLI: serving a router on a
//! listener ([`serve`]) and the API's request and answer shapes ([`types`]).

pub mod serve;
pub mod types;
