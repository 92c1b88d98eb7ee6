//! `sessiongate session`: record, end, list, show and import device sessions on a
//! running agent.

use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use super::{
    SessionCommand, Target,
    target::{decode, print_json},
};
use crate::{
    api::{
        client::{ApiClient, ClientError},
        server::MAX_IMPORT_BODY,
    },
    errln,
    input::{self, file::Accept, printable},
    outln,
    wire::{ImportReport, LoginBody, SessionDetail, SessionView},
};

/// `sessiongate session`.
pub(super) async fn execute(target: &Target, command: &SessionCommand) -> anyhow::Result<()> {
    let client = target.client()?;
    match command {
        SessionCommand::Login {
            ip,
            user,
            idp,
            at,
            groups,
        } => {
            let body = LoginBody {
                ip: ip.to_string(),
                user: user.clone(),
                idp: idp.clone(),
                at: at.clone(),
                groups: groups.clone(),
            };
            login(&client, body).await
        }
        SessionCommand::Logout { ip } => logout(&client, *ip).await,
        SessionCommand::Import { file, skip_bad } => import(&client, file, *skip_bad).await,
        SessionCommand::List { json } => list(&client, *json).await,
        SessionCommand::Show { ip, json } => show(&client, *ip, *json).await,
    }
}

/// `sessiongate session login`.
async fn login(client: &ApiClient, body: LoginBody) -> anyhow::Result<()> {
    let body = serde_json::to_value(body)?;
    let view: SessionView = decode(
        client
            .call(Method::POST, "/v1/sessions", Some(body))
            .await?,
    )?;
    outln!(
        "{} logged in as {} (IdP {}), authenticated at {}, session age {}",
        view.ip,
        printable(&view.user),
        printable(&view.idp),
        view.authenticated_at,
        view.age
    );
    Ok(())
}

/// `sessiongate session logout`.
async fn logout(client: &ApiClient, ip: IpAddr) -> anyhow::Result<()> {
    let view: SessionView = decode(
        client
            .call(Method::DELETE, &format!("/v1/sessions/{ip}"), None)
            .await?,
    )?;
    outln!("{} logged out (was {})", view.ip, printable(&view.user));
    Ok(())
}

/// `sessiongate session list`: one line per session, under a header.
async fn list(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let value = client.get("/v1/sessions").await?;
    if json {
        return print_json(&value);
    }
    let sessions: Vec<SessionView> = decode(value)?;
    outln!(
        "{:<40} {:<30} {:<12} {:<26} AGE",
        "DEVICE",
        "USER",
        "IDP",
        "AUTHENTICATED AT"
    );
    for s in sessions {
        outln!(
            "{:<40} {:<30} {:<12} {:<26} {}",
            s.ip,
            printable(&s.user),
            printable(&s.idp),
            s.authenticated_at,
            s.age
        );
    }
    Ok(())
}

/// `sessiongate session show`: the session, then where it stands with each policy.
async fn show(client: &ApiClient, ip: IpAddr, json: bool) -> anyhow::Result<()> {
    let value = client.get(&format!("/v1/sessions/{ip}")).await?;
    if json {
        return print_json(&value);
    }
    let detail: SessionDetail = decode(value)?;
    let s = &detail.session;
    outln!("device            {}", s.ip);
    outln!("user              {}", printable(&s.user));
    outln!("idp               {}", printable(&s.idp));
    outln!("authenticated at  {} (age {})", s.authenticated_at, s.age);
    if detail.policies.is_empty() {
        outln!("no policy checks sessions");
    }
    for p in &detail.policies {
        let standing = match (p.applies, p.satisfied) {
            (false, _) => "does not apply: the identity does not match".to_string(),
            (true, true) => format!("satisfied, {} left", p.margin),
            (true, false) => format!("EXPIRED {} ago: re-authentication required", p.margin),
        };
        let condition = p
            .identity
            .as_deref()
            .map_or(String::new(), |c| format!(" (identity {c})"));
        outln!(
            "policy {:<30} needs <= {:<12} {standing}{condition}",
            format!("{:?}", p.policy),
            p.duration
        );
    }
    Ok(())
}

/// `sessiongate session import`: uploads the file with a progress bar; the agent
/// validates every line and applies all of it (or, with `--skip-bad`, the good lines).
async fn import(client: &ApiClient, file: &Path, skip_bad: bool) -> anyhow::Result<()> {
    let data = input::file::read_bounded(file, MAX_IMPORT_BODY as u64, Accept::RegularFileOrPipe)
        .with_context(|| format!("cannot read {}", file.display()))?
        .bytes;
    let path = format!("/v1/sessions/import?skip_bad={skip_bad}");
    match upload_with_progress(client, &path, data).await {
        Ok(value) => {
            let report: ImportReport = decode(value.clone())?;
            print_line_errors(file, &value["errors"]);
            outln!(
                "imported {} sessions from {} ({} new devices, {} reset){}",
                report.imported,
                file.display(),
                report.new_devices,
                report.reset_devices,
                if report.skipped_lines > 0 {
                    format!("; skipped {} bad lines", report.skipped_lines)
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        Err(ClientError::Api {
            code,
            message,
            body,
            ..
        }) if code == "import_rejected" => {
            print_line_errors(file, &body["errors"]);
            let shown = body["errors"].as_array().map_or(0, Vec::len);
            let total = body["error_count"].as_u64().unwrap_or(0) as usize;
            if total > shown {
                errln!("... and {} more", total - shown);
            }
            anyhow::bail!("{}: {message}", file.display())
        }
        Err(e) => Err(e.into()),
    }
}

/// Uploads `data` under a progress bar that says "applying" once the last byte is sent,
/// and clears the bar when the agent replies.
async fn upload_with_progress(
    client: &ApiClient,
    path: &str,
    data: Vec<u8>,
) -> Result<Value, ClientError> {
    let bar = ProgressBar::new(data.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {bytes}/{total_bytes} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("uploading");
    let progress = bar.clone();
    let pending = client.upload(path, data.into(), move |sent| {
        progress.set_position(sent);
        if sent == progress.length().unwrap_or(0) {
            progress.set_message("applying");
        }
    });
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let result = pending.await;
    bar.finish_and_clear();
    result
}

/// The agent's complaints about the file's lines, as `file:line: message`.
fn print_line_errors(file: &Path, errors: &Value) {
    for e in errors.as_array().into_iter().flatten() {
        errln!(
            "{}:{}: {}",
            file.display(),
            e["line"],
            e["message"].as_str().unwrap_or("?")
        );
    }
}
