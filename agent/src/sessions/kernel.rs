//! The kernel's session maps as the store writes them: `datapath::SessionMaps`, or a fake in
//! the tests that fails on demand, so every undo path is tested without root.

use std::net::IpAddr;

use agent_common::maps::Session;

use crate::datapath::{DatapathError, SessionMaps};

pub trait KernelSessions {
    fn set_session(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError>;
    /// Removes a device's session; absent is fine.
    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    /// Writes many sessions in one go.
    fn load_sessions(&mut self, sessions: &[(IpAddr, Session)]) -> Result<(), DatapathError>;
    /// Devices with a session in the kernel.
    fn session_devices(&self) -> Result<Vec<IpAddr>, DatapathError>;
}

impl KernelSessions for SessionMaps {
    fn set_session(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError> {
        SessionMaps::set_session(self, ip, session)
    }

    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        SessionMaps::remove_session(self, ip)
    }

    fn load_sessions(&mut self, sessions: &[(IpAddr, Session)]) -> Result<(), DatapathError> {
        SessionMaps::load_sessions(self, sessions)
    }

    fn session_devices(&self) -> Result<Vec<IpAddr>, DatapathError> {
        SessionMaps::session_devices(self)
    }
}
