//! `sessiongate detach`: removes what a stopped agent leaves behind.

use std::path::Path;

use crate::{api::client::ApiClient, config::Config, outln};

/// `sessiongate detach`.
pub(super) async fn execute(config_path: &Path, keep_sessions: bool) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let agent = &config.agent;
    if ApiClient::new(&agent.api_socket)
        .get("/v1/health")
        .await
        .is_ok()
    {
        anyhow::bail!(
            "an agent is running on {}; stop it first (systemctl stop sessiongate)",
            agent.api_socket.display()
        );
    }
    let removed = crate::datapath::remove_pins(&agent.pin_dir)?;
    if removed.is_empty() {
        outln!("no pinned datapath under {}", agent.pin_dir.display());
    }
    for dir in removed {
        outln!("removed {} (the program is detached)", dir.display());
    }
    if agent.portal_listen.is_some() {
        crate::portal::routing::remove();
        outln!("removed the portal's policy routing");
    }
    // The per-policy refusal counts belong to the datapath just removed.
    let mut gone = vec![
        agent.api_socket.clone(),
        agent.state_dir.join(crate::drops::FILE_NAME),
    ];
    if !keep_sessions {
        gone.extend(crate::sessions::state_files(&agent.state_dir));
    }
    for path in gone {
        match std::fs::remove_file(&path) {
            Ok(()) => outln!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot remove {}: {e}", path.display()),
        }
    }
    if !keep_sessions {
        // Only if nothing else lives there.
        let _ = std::fs::remove_dir(&agent.state_dir);
    }
    Ok(())
}
