//! Attaching the XDP program (and the portal's TC program) to interfaces, as pinned
//! links that outlive the agent, and choosing the XDP mode.

use aya::programs::{
    LinkOrder, ProgramError, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::TcAttachOptions,
    xdp::{XdpLink, XdpMode as AyaXdpMode},
};

use super::{AttachedMode, Datapath, DatapathError, pins::LayoutDir, sys};
use crate::config::XdpMode;

/// What a pinned link attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LinkKind {
    /// The XDP program, in this mode.
    Xdp(AttachedMode),
    /// The portal's TC program (ingress).
    Portal,
}

/// A pinned link's file name: the interface and what is attached there (the XDP mode,
/// or `portal`). A colon, because interface names never hold one and bpffs reserves
/// dots.
fn link_name(interface: &str, kind: LinkKind) -> String {
    match kind {
        LinkKind::Xdp(mode) => format!("{interface}:{}", mode.name()),
        LinkKind::Portal => format!("{interface}:portal"),
    }
}

/// Pins an attachment (XDP or TC link) of `interface` in `dir`, so that it outlives
/// the agent.
fn pin_link<L>(
    dir: &LayoutDir,
    interface: &str,
    kind: LinkKind,
    link: L,
) -> Result<(), DatapathError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let pin_error = |source: std::io::Error| DatapathError::Pins {
        dir: dir.root.clone(),
        source,
    };
    let link = FdLink::try_from(link).map_err(|e| pin_error(std::io::Error::other(e)))?;
    // Dropping the returned handle closes our fd; the pin keeps the attachment.
    link.pin(dir.link(&link_name(interface, kind)))
        .map_err(|e| pin_error(std::io::Error::other(e)))?;
    Ok(())
}

pub(super) fn parse_link_name(name: &str) -> Option<(String, LinkKind)> {
    let (interface, kind) = name.rsplit_once(':')?;
    let kind = match kind {
        "native" => LinkKind::Xdp(AttachedMode::Native),
        "generic" => LinkKind::Xdp(AttachedMode::Generic),
        "portal" => LinkKind::Portal,
        _ => return None,
    };
    Some((interface.to_string(), kind))
}

impl Datapath {
    /// Turns the portal on: its TC program is attached wherever the XDP program is,
    /// and will be. Call it before writing settings that name a portal, so that no
    /// handed-over connection ever finds an interface without it.
    pub fn enable_portal(&mut self) -> Result<(), DatapathError> {
        self.portal = true;
        let interfaces: Vec<String> = self.attached.iter().map(|(i, _)| i.clone()).collect();
        for interface in interfaces {
            self.attach_portal(&interface)?;
        }
        Ok(())
    }

    /// Turns the portal off: removes its TC attachments. Call it once settings without
    /// a portal are in force.
    pub fn disable_portal(&mut self) -> Result<(), DatapathError> {
        self.portal = false;
        if let Some(dir) = self.pins.clone() {
            for name in dir.linked_interfaces() {
                if let Some((interface, LinkKind::Portal)) = parse_link_name(&name) {
                    std::fs::remove_file(dir.link(&name)).map_err(|source| {
                        DatapathError::Pins {
                            dir: dir.root.clone(),
                            source,
                        }
                    })?;
                    tracing::info!(interface, "portal detached: no portal_listen in the config");
                }
            }
        }
        self.portal_links.clear();
        Ok(())
    }

    /// Attaches the portal's TC program (TCX ingress) to `interface`, pinned like the
    /// XDP link so that it outlives the agent: with the agent down it drops handed-over
    /// connections instead of letting them through.
    fn attach_portal(&mut self, interface: &str) -> Result<(), DatapathError> {
        if self.portal_links.iter().any(|i| i == interface) {
            return Ok(());
        }
        let attach_error = |source| DatapathError::Attach {
            interface: interface.to_string(),
            mode: "tc",
            source,
        };
        let program = self.portal_program_mut();
        let id = program
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(attach_error)?;
        if let Some(dir) = self.pins.clone() {
            let link = self
                .portal_program_mut()
                .take_link(id)
                .map_err(attach_error)?;
            pin_link(&dir, interface, LinkKind::Portal, link)?;
        }
        self.portal_links.push(interface.to_string());
        Ok(())
    }

    /// Attaches to `interface`. `Auto` tries native mode and falls back to generic,
    /// with a warning, when the driver has no XDP support. A pinned datapath that is
    /// already attached there keeps that attachment; one replacing another swaps the
    /// program of the old attachment in one step (`bpf_link_update`).
    pub fn attach(
        &mut self,
        interface: &str,
        mode: XdpMode,
    ) -> Result<AttachedMode, DatapathError> {
        if !interface_exists(interface) {
            return Err(DatapathError::NoInterface {
                interface: interface.to_string(),
            });
        }
        if self.portal {
            self.attach_portal(interface)?;
        }
        if let Some((_, m)) = self.attached.iter().find(|(i, _)| i == interface) {
            return Ok(*m);
        }
        if let Some(m) = self.take_over(interface)? {
            self.attached.push((interface.to_string(), m));
            return Ok(m);
        }
        let attach = |dp: &mut Self, m: AttachedMode| {
            let aya_mode = match m {
                AttachedMode::Native => AyaXdpMode::Driver,
                AttachedMode::Generic => AyaXdpMode::Skb,
            };
            let attach_error = |source| DatapathError::Attach {
                interface: interface.to_string(),
                mode: m.name(),
                source,
            };
            let program = dp.program_mut();
            let id = program.attach(interface, aya_mode).map_err(attach_error)?;
            if let Some(dir) = dp.pins.clone() {
                let link = dp.program_mut().take_link(id).map_err(attach_error)?;
                pin_link(&dir, interface, LinkKind::Xdp(m), link)?;
            }
            Ok(m)
        };
        let attached = match mode {
            XdpMode::Native => attach(self, AttachedMode::Native)?,
            XdpMode::Generic => attach(self, AttachedMode::Generic)?,
            XdpMode::Auto => match attach(self, AttachedMode::Native) {
                Ok(m) => m,
                Err(native) => {
                    tracing::warn!(
                        interface,
                        error = %native,
                        "native XDP is not available; falling back to generic mode, which is slower"
                    );
                    attach(self, AttachedMode::Generic)?
                }
            },
        };
        self.attached.push((interface.to_string(), attached));
        Ok(attached)
    }

    /// Moves an attachment of a datapath being replaced to this program.
    fn take_over(&mut self, interface: &str) -> Result<Option<AttachedMode>, DatapathError> {
        let Some(dir) = self.pins.clone() else {
            return Ok(None);
        };
        let found = self.replacing.iter().find_map(|old| {
            old.linked_interfaces().into_iter().find_map(|name| {
                let (i, kind) = parse_link_name(&name)?;
                match kind {
                    LinkKind::Xdp(m) if i == interface => Some((old.link(&name), m)),
                    _ => None,
                }
            })
        });
        let Some((path, mode)) = found else {
            return Ok(None);
        };
        // A link whose interface was removed or recreated cannot take a new program:
        // drop it and attach anew.
        if sys::link_ifindex(&path).is_ok_and(|index| index != interface_index(interface)) {
            tracing::warn!(
                interface,
                "the replaced attachment no longer holds; attaching anew"
            );
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        let swap_error = |e: String| DatapathError::Attach {
            interface: interface.to_string(),
            mode: mode.name(),
            source: ProgramError::IOError(std::io::Error::other(e)),
        };
        let old = PinnedLink::from_pin(&path).map_err(|e| swap_error(e.to_string()))?;
        let link = XdpLink::try_from(FdLink::from(old)).map_err(|e| swap_error(e.to_string()))?;
        let id = self
            .program_mut()
            .attach_to_link(link)
            .map_err(|e| swap_error(e.to_string()))?;
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|e| swap_error(e.to_string()))?;
        pin_link(&dir, interface, LinkKind::Xdp(mode), link)?;
        tracing::info!(interface, "swapped the program of the existing attachment");
        Ok(Some(mode))
    }

    /// Detaches from interfaces not in `keep` (a pinned datapath adopted with a config
    /// that no longer lists them).
    pub fn detach_others(&mut self, keep: &[String]) -> Result<(), DatapathError> {
        let Some(dir) = self.pins.clone() else {
            return Ok(());
        };
        for name in dir.linked_interfaces() {
            let Some((interface, _)) = parse_link_name(&name) else {
                continue;
            };
            if !keep.contains(&interface) {
                std::fs::remove_file(dir.link(&name)).map_err(|source| DatapathError::Pins {
                    dir: dir.root.clone(),
                    source,
                })?;
                self.attached.retain(|(i, _)| *i != interface);
                self.portal_links.retain(|i| *i != interface);
                tracing::info!(interface, "detached: no longer in the config");
            }
        }
        Ok(())
    }
}

/// The mode to attach `interface` in: as configured, except that `auto` picks generic
/// on a veth when some policy answers refusals (`replies_on_veth`: reject or redirect
/// on a veth, `is_veth`), since in native mode a veth hands the program's replies
/// (XDP_TX) to its peer only if the peer runs XDP too, and `auto` must pick a mode in
/// which every configured action works.
pub fn attach_mode(configured: XdpMode, replies_on_veth: bool, interface: &str) -> XdpMode {
    let mode = choose_mode(configured, replies_on_veth);
    if mode != configured {
        tracing::info!(
            interface,
            "xdp_mode auto: generic mode on this veth, where the replies of reject and redirect policies need it"
        );
    }
    mode
}

const fn choose_mode(configured: XdpMode, replies_on_veth: bool) -> XdpMode {
    match configured {
        XdpMode::Auto if replies_on_veth => XdpMode::Generic,
        other => other,
    }
}

/// Whether `interface` is a veth (by `ip -d link`): frames the program sends back on
/// one (XDP_TX) in native mode reach its peer only when the peer runs XDP as well.
pub fn is_veth(interface: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", interface])
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
        .is_some_and(|links| links[0]["linkinfo"]["info_kind"] == "veth")
}

pub fn interface_exists(name: &str) -> bool {
    interface_index(name) != 0
}

/// The interface's index; 0 if there is none of that name.
pub(super) fn interface_index(name: &str) -> u32 {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated string.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_generic_on_a_veth_only_when_policies_answer_refusals() {
        assert_eq!(choose_mode(XdpMode::Auto, true), XdpMode::Generic);
        assert_eq!(choose_mode(XdpMode::Auto, false), XdpMode::Auto);
        // An explicit mode is the operator's: native stays native (with a warning).
        assert_eq!(choose_mode(XdpMode::Native, true), XdpMode::Native);
        assert_eq!(choose_mode(XdpMode::Generic, false), XdpMode::Generic);
    }
}
