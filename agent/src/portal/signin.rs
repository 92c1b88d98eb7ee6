//! The portal's sign-in pages, served on its own address (`portal_url`): `/login`
//! sends the device's browser to its identity provider, and `/callback` takes it back,
//! records the session and says what the device may now reach. Every outcome, good or
//! bad, is an audit log line; a refused sign-in records nothing.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    Backend,
    page::{button, document, escape},
};
use crate::signin::SignIn;

/// `GET /login[?idp=NAME]`: the provider named, else the one the device enrolled
/// with, else the only one; with several and no session, a choice.
pub(super) async fn login(
    backend: &Arc<dyn Backend>,
    signin: &SignIn,
    device: IpAddr,
    query: &HashMap<String, String>,
) -> Response {
    let idp = match query.get("idp") {
        Some(idp) => Some(idp.clone()),
        None => {
            let backend = Arc::clone(backend);
            blocking(move || backend.enrolled_idp(device)).await
        }
    };
    let names = signin.names();
    let idp = match (idp, names.as_slice()) {
        (Some(idp), _) if !names.contains(&idp.as_str()) => return not_offered(device, &idp),
        (Some(idp), _) => idp,
        (None, [only]) => only.to_string(),
        (None, _) => return choose(&names),
    };
    match signin.start(device, &idp).await {
        Ok(url) => {
            tracing::info!(target: "audit", device = %device, idp = idp.as_str(), "sign-in started");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, url.as_str()),
                    (header::CACHE_CONTROL, "no-store"),
                ],
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(target: "audit", device = %device, idp = idp.as_str(), error = %e, "sign-in could not start");
            page(
                StatusCode::BAD_GATEWAY,
                "Sign-in is not available",
                &format!(
                    "<p>{}</p><p>Try again in a moment; if it goes on, tell your administrator.</p>",
                    escape(&e.to_string())
                ),
            )
        }
    }
}

/// `GET /callback?state=..&code=..` (or `&error=..` when the user cancelled or the
/// provider refused).
pub(super) async fn callback(
    backend: &Arc<dyn Backend>,
    signin: &SignIn,
    device: IpAddr,
    query: &HashMap<String, String>,
) -> Response {
    let state = query.get("state").map_or("", String::as_str);
    if let Some(error) = query.get("error") {
        // The state is used up either way.
        signin.abandon(device, state);
        let detail = query.get("error_description").unwrap_or(error);
        tracing::info!(target: "audit", device = %device, error = error.as_str(), "sign-in refused by the identity provider");
        return page(
            StatusCode::FORBIDDEN,
            "Sign-in cancelled",
            &format!(
                "<p>The identity provider did not sign you in: {}.</p><p>Nothing was recorded.</p>{}",
                escape(detail),
                button("/login", "Try again")
            ),
        );
    }
    let code = query.get("code").map_or("", String::as_str);
    let (idp, identity) = match signin.finish(device, state, code).await {
        Ok(done) => done,
        Err(e) => {
            tracing::info!(target: "audit", device = %device, error = %e, "sign-in refused");
            return page(
                StatusCode::FORBIDDEN,
                "Sign-in failed",
                &format!(
                    "<p>{}</p><p>Nothing was recorded.</p>{}",
                    escape(&e.to_string()),
                    button("/login", "Start again")
                ),
            );
        }
    };
    let recorded = {
        let (backend, idp, identity) = (Arc::clone(backend), idp.clone(), identity.clone());
        blocking(move || backend.signed_in(device, &idp, &identity)).await
    };
    match recorded {
        Ok(standing) => {
            tracing::info!(target: "audit", device = %device, user = identity.user.as_str(), idp = idp.as_str(), groups = ?identity.groups, "signed in at the portal");
            page(
                StatusCode::OK,
                "You are signed in",
                &signed_in(&identity.user, &standing),
            )
        }
        Err(e) => {
            tracing::info!(target: "audit", device = %device, user = identity.user.as_str(), idp = idp.as_str(), error = %e, "sign-in not recorded");
            page(
                StatusCode::CONFLICT,
                "Sign-in not accepted here",
                &format!("<p>{}</p><p>Nothing was recorded.</p>", escape(&e)),
            )
        }
    }
}

/// What a signed-in device may now reach: each session-checked policy, and until when.
fn signed_in(user: &str, standing: &[(String, String)]) -> String {
    let rows: String = standing
        .iter()
        .map(|(policy, left)| format!("<dt>{}</dt><dd>{}</dd>\n", escape(policy), escape(left)))
        .collect();
    format!(
        "<p>Signed in as {}. Your session starts now.</p>\n<dl>\n{rows}</dl>",
        escape(user)
    )
}

/// The device enrolled through a provider this portal does not offer: it can only
/// reset its session through that one.
fn not_offered(device: IpAddr, idp: &str) -> Response {
    tracing::info!(target: "audit", device = %device, idp, "sign-in refused: the device's identity provider is not offered here");
    page(
        StatusCode::FORBIDDEN,
        "Sign-in is not available for this device",
        &format!(
            "<p>This device enrolled through the identity provider {}, and its session resets only through that one, which this portal does not offer.</p><p>Ask your administrator to log the device out, or to sign it in again.</p>",
            escape(idp)
        ),
    )
}

/// With several providers and nothing to choose by: one button each.
fn choose(names: &[&str]) -> Response {
    let buttons: String = names
        .iter()
        .map(|n| {
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("idp", n)
                .finish();
            button(&format!("/login?{query}"), n)
        })
        .collect();
    page(StatusCode::OK, "Choose how to sign in", &buttons)
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        document(title, body),
    )
        .into_response()
}

/// Runs a backend call (which takes the session lock and may wait for a sync) off the
/// async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
