//! The re-authentication portal. Expired devices' HTTP connections (port 80) are steered
//! in the kernel to a transparent listening socket of the agent, so an accepted
//! connection's local address is the one the device dialled and its peer the device.
//! Every request gets `511 Network Authentication Required` and a short page naming the
//! user, the device and the policy, with a link to sign in again.

mod page;
pub mod routing;
mod server;

pub use page::{PageFacts, render};
pub use server::{bind_transparent, serve};
