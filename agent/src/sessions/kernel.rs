//! The kernel's session maps as the store writes them: `datapath::SessionMaps`, or a fake in
//! the tests that fails on demand, so every undo path is tested without root.

use std::net::IpAddr;

use agent_common::maps::Session;

use crate::{
    config::{Identity, IdentityCondition},
    datapath::{DatapathError, SessionMaps},
};

pub trait KernelSessions {
    /// Writes a device's session, with identity masks for `who`.
    fn set_session(
        &mut self,
        ip: IpAddr,
        session: Session,
        who: &Identity<'_>,
    ) -> Result<(), DatapathError>;
    /// Removes a device's session; absent is fine.
    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    /// Writes many sessions in one go.
    fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>)],
    ) -> Result<(), DatapathError>;
    /// Devices with a session in the kernel.
    fn session_devices(&self) -> Result<Vec<IpAddr>, DatapathError>;
    /// Writes every device's identity mask of configuration set `set` for
    /// `conditions` (`identity_of` tells who each device is), before the set is put in
    /// force.
    fn prepare_identities<'a>(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        identity_of: &dyn Fn(IpAddr) -> Option<Identity<'a>>,
    ) -> Result<(), DatapathError>;
}

impl KernelSessions for SessionMaps {
    fn set_session(
        &mut self,
        ip: IpAddr,
        session: Session,
        who: &Identity<'_>,
    ) -> Result<(), DatapathError> {
        SessionMaps::set_session(self, ip, session, who)
    }

    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        SessionMaps::remove_session(self, ip)
    }

    fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>)],
    ) -> Result<(), DatapathError> {
        SessionMaps::load_sessions(self, sessions)
    }

    fn session_devices(&self) -> Result<Vec<IpAddr>, DatapathError> {
        SessionMaps::session_devices(self)
    }

    fn prepare_identities<'a>(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        identity_of: &dyn Fn(IpAddr) -> Option<Identity<'a>>,
    ) -> Result<(), DatapathError> {
        let devices: Vec<(u32, Identity<'a>)> = self
            .kernel_sessions()?
            .into_iter()
            .filter_map(|(ip, s)| Some((s.identity, identity_of(ip)?)))
            .collect();
        self.identities.prepare(set, conditions, &devices)
    }
}
