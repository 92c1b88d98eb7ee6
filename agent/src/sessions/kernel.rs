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
    /// `conditions`, before the set is put in force. `identities` tells who each device
    /// is, in address order (as the store iterates).
    fn prepare_identities<'a>(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        identities: &mut dyn Iterator<Item = (IpAddr, Identity<'a>)>,
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
        identities: &mut dyn Iterator<Item = (IpAddr, Identity<'a>)>,
    ) -> Result<(), DatapathError> {
        // Without conditions the set has no identity answers: its masks are never read.
        if conditions.is_empty() {
            self.identities.forget(set);
            return Ok(());
        }
        let started = std::time::Instant::now();
        let mut in_kernel = self.kernel_sessions()?;
        in_kernel.sort_unstable_by_key(|(ip, _)| *ip);
        let read = started.elapsed();
        // Both in address order: one pass pairs each kernel session with its identity.
        let mut devices: Vec<(u32, Identity<'a>)> = Vec::with_capacity(in_kernel.len());
        let mut kernel = in_kernel.iter().peekable();
        for (ip, who) in identities {
            while kernel.next_if(|(k, _)| *k < ip).is_some() {}
            if let Some((_, session)) = kernel.next_if(|(k, _)| *k == ip) {
                devices.push((session.identity, who));
            }
        }
        let paired = started.elapsed();
        self.identities.prepare(set, conditions, &devices)?;
        tracing::info!(
            devices = devices.len(),
            read_ms = read.as_millis() as u64,
            paired_ms = (paired - read).as_millis() as u64,
            written_ms = (started.elapsed() - paired).as_millis() as u64,
            "identity masks written for the configuration about to be put in force"
        );
        Ok(())
    }
}
