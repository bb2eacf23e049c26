//! The Outpost agent: dials out to a coordinator over one stream, advertises
//! what its host can do, runs the actions it is leased in the requested
//! isolation, and uploads their results. It opens no listening port.
//!
//! The dial-out link, host capabilities, local CAS cache and runners arrive
//! with the fleet work; the crate exists now so that the workspace has its
//! final shape and `coordinator` and `agent` stay independent.
