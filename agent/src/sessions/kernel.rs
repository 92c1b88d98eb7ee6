//! The kernel's session maps as the store writes them: `datapath::Maps`, or a fake in
//! the tests that fails on demand, so every undo path is tested without root.

use std::net::IpAddr;

use agent_common::maps::Session;

use crate::datapath::{DatapathError, Maps};

pub trait KernelSessions {
    fn set_session(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError>;
    /// Removes a device's session; absent is fine.
    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    /// Writes many sessions in one go.
    fn load_sessions(&mut self, sessions: &[(IpAddr, Session)]) -> Result<(), DatapathError>;
}

impl KernelSessions for Maps {
    fn set_session(&mut self, ip: IpAddr, session: Session) -> Result<(), DatapathError> {
        Maps::set_session(self, ip, session)
    }

    fn remove_session(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        Maps::remove_session(self, ip)
    }

    fn load_sessions(&mut self, sessions: &[(IpAddr, Session)]) -> Result<(), DatapathError> {
        Maps::load_sessions(self, sessions)
    }
}
