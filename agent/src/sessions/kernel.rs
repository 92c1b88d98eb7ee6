//! The kernel's session maps as the store writes them: `datapath::SessionMaps`, or a fake in
//! the tests that fails on demand, so every undo path is tested without root.

use std::net::IpAddr;

use agent_common::maps::Session;

use crate::{
    config::{Identity, IdentityCondition},
    datapath::{DatapathError, SessionMaps},
};

pub trait KernelSessions {
    /// Writes a device's session, with identity masks for `who`; returns the identity
    /// slot the kernel's copy now holds.
    fn set_session(
        &mut self,
        ip: IpAddr,
        session: Session,
        who: &Identity<'_>,
    ) -> Result<u32, DatapathError>;
    /// Removes a device's session; absent is fine.
    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    /// Writes many sessions in one go, each with the identity slot its device's
    /// current kernel copy holds (`None`: it has none); returns each one's new slot.
    fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError>;
    /// Devices with a session in the kernel (wherever the program would find it), with
    /// that session (its identity slot included).
    fn kernel_sessions(&self) -> Result<Vec<(IpAddr, Session)>, DatapathError>;
    /// `kernel_sessions`, where an implementation may hand over a list it already
    /// read, if nothing was written since.
    fn take_kernel_sessions(&mut self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        self.kernel_sessions()
    }
    /// Writes configuration set `set`'s identity masks for `conditions`, `masks[i]` to
    /// slot `slots[i]` (every device's), before the set is put in force.
    fn prepare_identities(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        slots: &[u32],
        masks: &[u64],
    ) -> Result<(), DatapathError>;
}

impl KernelSessions for SessionMaps {
    fn set_session(
        &mut self,
        ip: IpAddr,
        session: Session,
        who: &Identity<'_>,
    ) -> Result<u32, DatapathError> {
        SessionMaps::set_session(self, ip, session, who)
    }

    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        SessionMaps::remove_session(self, ip)
    }

    fn load_sessions(
        &mut self,
        sessions: &[(IpAddr, Session, Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        SessionMaps::load_sessions(self, sessions)
    }

    fn kernel_sessions(&self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        SessionMaps::kernel_sessions(self)
    }

    fn take_kernel_sessions(&mut self) -> Result<Vec<(IpAddr, Session)>, DatapathError> {
        SessionMaps::take_kernel_sessions(self)
    }

    fn prepare_identities(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        slots: &[u32],
        masks: &[u64],
    ) -> Result<(), DatapathError> {
        // Without conditions the set has no identity answers: its masks are never read.
        if conditions.is_empty() {
            self.identities.forget(set);
            return Ok(());
        }
        self.identities.prepare(set, conditions, slots, masks)
    }
}
