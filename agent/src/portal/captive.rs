//! RFC 8908's captive-portal API at `/captive-portal`: what an operating system asks
//! (found through DHCP option 114 or the IPv6 RA option 37, RFC 8910) to show its own
//! sign-in prompt, before and when the device's session runs out.

use std::{net::IpAddr, sync::Arc};

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::Backend;

/// `GET /captive-portal`: the asking device's standing, as `application/captive+json`.
pub(super) async fn status(
    backend: &Arc<dyn Backend>,
    device: IpAddr,
    user_portal_url: Option<&str>,
) -> Response {
    let backend = Arc::clone(backend);
    let standing = match tokio::task::spawn_blocking(move || backend.captive(device)).await {
        Ok(standing) => standing,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let mut body = json!({
        "captive": standing.captive,
        "can-extend-session": true,
    });
    if let Some(url) = user_portal_url {
        body["user-portal-url"] = json!(url);
    }
    if let (false, Some(left)) = (standing.captive, standing.seconds_remaining) {
        body["seconds-remaining"] = json!(left);
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/captive+json"),
            (header::CACHE_CONTROL, "private, no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}
