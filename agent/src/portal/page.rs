//! The page: a small, accessible HTML5 document built with `format!`, every interpolated
//! value escaped, no script.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::config::GoDuration;

/// What the page says about the refused connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageFacts {
    /// The client (peer) address.
    pub device: IpAddr,
    /// What the client dialled: the local address of the accepted socket.
    pub destination: SocketAddr,
    /// `None`: the device has no session.
    pub user: Option<String>,
    /// The policy's name; `None` if no policy matches any more.
    pub policy: Option<String>,
    /// `None`: no session.
    pub session_age: Option<Duration>,
    /// The policy's session duration, if any.
    pub max_age: Option<Duration>,
    /// Where to re-authenticate elsewhere (`reauth_url`).
    pub reauth_url: Option<String>,
    /// The portal's own sign-in page, when identity providers are configured: the
    /// page's button leads there instead.
    pub sign_in_url: Option<String>,
}

/// Large type, one column, strong contrast and a visible focus ring; nothing else.
const STYLE: &str = "body{font:1.125rem/1.5 system-ui,sans-serif;margin:0;color:#1a1a1a;background:#fff}\
main{max-width:36rem;margin:3rem auto;padding:0 1rem}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem}dt{font-weight:600}dd{margin:0}\
a.reauth{display:inline-block;margin-top:1rem;padding:.75rem 1.5rem;border-radius:.375rem;\
background:#0b57d0;color:#fff;font-weight:600;text-decoration:none}\
a.reauth:focus-visible{outline:3px solid #1a1a1a;outline-offset:3px}";

/// The whole document for one refused request.
pub fn render(facts: &PageFacts) -> String {
    let title = match facts.user {
        None => "Sign in to continue",
        Some(_) => "Sign in again to continue",
    };
    let reason = match (&facts.user, facts.max_age) {
        (None, _) => {
            "This device has no session, so this application is not available to it.".to_string()
        }
        (Some(_), Some(max)) => format!(
            "Your session for this application is older than its policy allows ({}).",
            age(max)
        ),
        (Some(_), None) => {
            "Your session for this application is older than its policy allows.".to_string()
        }
    };
    let action = match (&facts.sign_in_url, &facts.reauth_url) {
        (Some(url), _) => button(url, "Sign in"),
        (None, Some(url)) => button(url, "Re-authenticate"),
        (None, None) => "<p>Ask your administrator how to sign in again.</p>".into(),
    };
    document(
        title,
        &format!(
            "<p>{}</p>\n<dl>\n\
         <dt>User</dt><dd>{}</dd>\n<dt>Device</dt><dd>{}</dd>\n\
         <dt>Destination</dt><dd>{}</dd>\n<dt>Policy</dt><dd>{}</dd>\n\
         <dt>Session age</dt><dd>{}</dd>\n</dl>\n{action}",
            escape(&reason),
            escape(facts.user.as_deref().unwrap_or("none (no session)")),
            escape(&facts.device.to_string()),
            escape(&facts.destination.to_string()),
            escape(facts.policy.as_deref().unwrap_or("none")),
            escape(&facts.session_age.map_or_else(|| "no session".into(), age)),
        ),
    )
}

/// A link styled as the page's one button.
pub(super) fn button(url: &str, label: &str) -> String {
    format!(
        "<p><a class=\"reauth\" href=\"{}\">{}</a></p>",
        escape(url),
        escape(label)
    )
}

/// A whole page: `title` as its heading, then `body` (already escaped HTML).
pub(super) fn document(title: &str, body: &str) -> String {
    let title = escape(title);
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n\
         <h1>{title}</h1>\n{body}\n</main>\n</body>\n</html>\n"
    )
}

/// Whole seconds as Gateway writes durations: `2h0m5s`, `45m0s`, `12s`.
pub(super) fn age(d: Duration) -> String {
    GoDuration(Duration::from_secs(d.as_secs())).to_string()
}

/// Text safe in element content and in quoted attribute values.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> PageFacts {
        PageFacts {
            device: "10.0.0.5".parse().unwrap(),
            destination: "198.19.10.10:80".parse().unwrap(),
            user: Some("alice".into()),
            policy: Some("payroll".into()),
            session_age: Some(Duration::from_secs(8 * 3600 + 12)),
            max_age: Some(Duration::from_secs(8 * 3600)),
            reauth_url: Some("https://sso.example.com/".into()),
            sign_in_url: None,
        }
    }

    #[test]
    fn names_the_session_and_links_the_reauth_url() {
        let html = render(&facts());
        assert!(
            html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"),
            "{html}"
        );
        assert!(
            html.contains("<h1>Sign in again to continue</h1>"),
            "{html}"
        );
        assert!(
            html.contains("older than its policy allows (8h0m0s)"),
            "{html}"
        );
        for row in [
            "<dt>User</dt><dd>alice</dd>",
            "<dt>Device</dt><dd>10.0.0.5</dd>",
            "<dt>Destination</dt><dd>198.19.10.10:80</dd>",
            "<dt>Policy</dt><dd>payroll</dd>",
            "<dt>Session age</dt><dd>8h0m12s</dd>",
        ] {
            assert!(html.contains(row), "missing {row} in {html}");
        }
        assert!(
            html.contains(
                "<a class=\"reauth\" href=\"https://sso.example.com/\">Re-authenticate</a>"
            ),
            "{html}"
        );
        assert!(!html.contains("<script"), "{html}");
    }

    #[test]
    fn without_a_reauth_url_there_is_no_link() {
        let html = render(&PageFacts {
            reauth_url: None,
            ..facts()
        });
        assert!(!html.contains("<a "), "{html}");
        assert!(html.contains("Ask your administrator"), "{html}");
    }

    #[test]
    fn a_device_without_a_session_is_told_so() {
        let html = render(&PageFacts {
            user: None,
            policy: None,
            session_age: None,
            ..facts()
        });
        assert!(html.contains("<h1>Sign in to continue</h1>"), "{html}");
        assert!(html.contains("This device has no session"), "{html}");
        assert!(html.contains("<dd>none (no session)</dd>"), "{html}");
        assert!(
            html.contains("<dt>Session age</dt><dd>no session</dd>"),
            "{html}"
        );
        assert!(!html.contains("older than"), "{html}");
    }

    #[test]
    fn every_value_is_escaped() {
        let html = render(&PageFacts {
            user: Some("<script>alert(1)</script>".into()),
            policy: Some("it's \"payroll\"".into()),
            reauth_url: Some("https://sso.example.com/?a=1&b=\"><script>x</script>".into()),
            ..facts()
        });
        assert!(!html.contains("<script"), "{html}");
        assert!(
            html.contains("<dd>&lt;script&gt;alert(1)&lt;/script&gt;</dd>"),
            "{html}"
        );
        assert!(
            html.contains("<dd>it&#39;s &quot;payroll&quot;</dd>"),
            "{html}"
        );
        assert!(
            html.contains(
                "href=\"https://sso.example.com/?a=1&amp;b=&quot;&gt;&lt;script&gt;x&lt;/script&gt;\""
            ),
            "{html}"
        );
        assert_eq!(escape("a&b<c>d\"e'f"), "a&amp;b&lt;c&gt;d&quot;e&#39;f");
    }

    #[test]
    fn ages_read_like_go_durations_to_the_second() {
        assert_eq!(age(Duration::from_secs(2 * 3600 + 5)), "2h0m5s");
        assert_eq!(age(Duration::from_secs(45 * 60)), "45m0s");
        assert_eq!(age(Duration::from_millis(12_999)), "12s");
        assert_eq!(age(Duration::from_millis(400)), "0s");
    }
}
