//! Reloads: read the config file again, check everything, and put it in force
//! atomically, or change nothing and say every reason. The steps that `run`'s start
//! shares (interfaces present, attaching) are here too.

use crate::{
    config::{self, Config, ConfigError, XdpMode},
    datapath::{self, AttachedMode, Datapath, DatapathError},
    policy::{self, PolicyTable},
    wire::{ReloadRejected, ReloadStatus, Reloaded},
};

use super::{Active, Control, lock, unix_now};

impl Control {
    pub fn reload_status(&self) -> ReloadStatus {
        lock(&self.reloads).clone()
    }

    /// Reads the config file again and puts it in force atomically. A config with any
    /// problem changes nothing and is rejected with every reason.
    pub fn reload(&self) -> Result<Reloaded, ReloadRejected> {
        let result = self.try_reload();
        let mut status = lock(&self.reloads);
        status.last_at = Some(unix_now());
        match &result {
            Ok(done) => {
                status.succeeded += 1;
                status.last_ok = Some(true);
                status.last_problems.clear();
                tracing::info!(
                    generation = done.generation,
                    policies = done.policies,
                    prefixes = done.prefixes,
                    "reloaded the config"
                );
                for warning in &done.warnings {
                    tracing::warn!("{warning}");
                }
            }
            Err(rejected) => {
                status.failed += 1;
                status.last_ok = Some(false);
                status.last_problems = rejected.problems.clone();
                tracing::error!(
                    problems = %rejected.problems.join("; "),
                    "reload rejected; the running policy stays"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> Result<Reloaded, ReloadRejected> {
        let old = self.active();
        let (config, table, mut warnings) = checked(&self.config_path, &old.config)?;
        // The devices' identity masks of the new set are written before the flip, with
        // the sessions held (lock order: sessions, then the datapath).
        let mut held = None;
        self.sessions
            .switch_config(
                policy::identity_conditions(&config, &table),
                &mut held,
                |held| {
                    let datapath = held.insert(lock(&self.datapath));
                    Ok(next_set(&datapath.maps))
                },
                |held| {
                    let datapath = held.as_mut().expect("locked by next_set");
                    lock(&self.drops).apply(
                        &mut datapath.maps,
                        policy::settings(&config),
                        &table,
                        policy_names(&config),
                    )
                },
            )
            .map_err(|e: DatapathError| ReloadRejected {
                problems: vec![format!("writing the policy maps failed: {e}")],
            })?;
        let mut datapath = held.expect("locked by next_set");
        // Interfaces added are attached, interfaces removed detached. The XDP mode is
        // the one the agent started with (changing it needs a restart).
        for (name, result) in attach_interfaces(&mut datapath, &config, old.config.agent.xdp_mode) {
            if let Err(e) = result {
                warnings.push(format!("interface {name}: {e}"));
            }
        }
        if let Err(e) = datapath.detach_others(&config.agent.interfaces) {
            warnings.push(format!("detaching removed interfaces: {e}"));
        }
        let active = Active::new(config, table, &datapath);
        let done = Reloaded {
            generation: active.generation,
            policies: active.config.policies.len(),
            prefixes: active.table.dest.len(),
            warnings,
        };
        self.publish(active);
        drop(datapath);
        Ok(done)
    }
}

/// The config at `path`, compiled and checked against the one in force (`old`): with
/// its warnings (`check`'s, and changes deferred to the next restart), or every reason
/// it cannot be put in force.
fn checked(
    path: &std::path::Path,
    old: &Config,
) -> Result<(Config, PolicyTable, Vec<String>), ReloadRejected> {
    let reject = |problems: Vec<String>| ReloadRejected { problems };
    let config = Config::load(path).map_err(|e| {
        reject(match e {
            ConfigError::Invalid { problems, .. } => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => vec![other.to_string()],
        })
    })?;
    let table = policy::compile(&config).map_err(|e| reject(vec![e.to_string()]))?;
    let restart_only = config::restart_only_changes(old, &config);
    let mut problems = restart_only.refused;
    let missing = missing_interfaces(&config);
    if !missing.is_empty() {
        problems.push(format!(
            "[agent] interfaces: {} not found on this host",
            missing.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(reject(problems));
    }
    let mut warnings: Vec<String> = policy::lint(&config, &table)
        .iter()
        .map(ToString::to_string)
        .collect();
    warnings.extend(restart_only.deferred);
    Ok((config, table, warnings))
}

/// The config's interfaces that this host does not have.
pub fn missing_interfaces(config: &Config) -> Vec<&str> {
    config
        .agent
        .interfaces
        .iter()
        .map(String::as_str)
        .filter(|name| !datapath::interface_exists(name))
        .collect()
}

/// Attaches the program to each of the config's interfaces (kept where it is already
/// attached) in the mode `configured` asks for, adjusted for veths when policies answer
/// refusals (`datapath::attach_mode`). Each interface with how it went.
pub fn attach_interfaces(
    datapath: &mut Datapath,
    config: &Config,
    configured: XdpMode,
) -> Vec<(String, Result<AttachedMode, DatapathError>)> {
    let replies = config.answers_refusals();
    config
        .agent
        .interfaces
        .iter()
        .map(|name| {
            let replies_on_veth = replies && datapath::is_veth(name);
            let mode = datapath::attach_mode(configured, replies_on_veth, name);
            (name.clone(), datapath.attach(name, mode))
        })
        .collect()
}

/// The config's policy names by index, as the kernel's per-policy counters count them.
pub fn policy_names(config: &Config) -> Vec<String> {
    config.policies.iter().map(|p| p.name.clone()).collect()
}

/// The configuration set the next `Maps::apply` writes.
pub fn next_set(maps: &datapath::Maps) -> usize {
    agent_common::maps::config_set(datapath::next_generation(maps.generation())) as usize
}
