//! The re-authentication portal. Expired devices' HTTP connections (port 80) are steered
//! in the kernel to a transparent listening socket of the agent, so an accepted
//! connection's local address is the one the device dialled and its peer the device.
//! Every request gets `511 Network Authentication Required` and a short page naming the
//! user, the device and the policy, with a link to sign in again. On its own address
//! (`portal_url`) it also serves the sign-in with the identity providers (`signin`).

mod captive;
mod page;
pub mod routing;
mod server;
mod signin;
pub mod tls;

use std::net::{IpAddr, SocketAddr};

pub use page::{PageFacts, render};
pub use server::{Portal, bind_transparent, serve};
pub use tls::PortalListener;

use crate::signin::Identity;

/// A device's standing as the captive-portal API tells it (RFC 8908).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Captive {
    /// Some session-checked policy would refuse the device's new flows now.
    pub captive: bool,
    /// While not captive: seconds until the first of its policies expires.
    pub seconds_remaining: Option<u64>,
}

/// What the portal asks of the running agent. Calls may take the session lock and wait
/// for the journal, so the portal makes them off its async workers.
pub trait Backend: Send + Sync + 'static {
    /// What the page tells `device`, which dialled `destination`.
    fn facts(&self, device: IpAddr, destination: SocketAddr) -> PageFacts;
    /// The identity provider the device's session came from, if it has one.
    fn enrolled_idp(&self, device: IpAddr) -> Option<String>;
    /// How the device stands for RFC 8908's captive-portal API.
    fn captive(&self, device: IpAddr) -> Captive;
    /// Records a sign-in as a login by the usual rules. For each session-checked policy
    /// in force: its name, and how long the device now satisfies it; or why the login
    /// was refused.
    fn signed_in(
        &self,
        device: IpAddr,
        idp: &str,
        identity: &Identity,
    ) -> Result<Vec<(String, String)>, String>;
}
