//! Signing in with an OpenID provider: sessiongate is the relying party. A device
//! starts a sign-in at the portal (`start`), the user authenticates at the provider,
//! and the provider sends the browser back with a code (`finish`), which is exchanged
//! for an ID token that the `openidconnect` crate verifies (signature against the
//! provider's keys, issuer, audience, expiry, nonce). The flow is the authorization
//! code flow with PKCE; its `state` is single-use, bound to the device that started
//! it, and short-lived.

mod claims;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use openidconnect::{
    AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken, EmptyExtraTokenFields,
    EndpointMaybeSet, EndpointNotSet, EndpointSet, IdToken, IdTokenFields, IdTokenVerifier,
    IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardErrorResponse, StandardTokenResponse, TokenResponse as _,
    core::{
        CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
        CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm, CoreProviderMetadata, CoreRevocableToken,
        CoreRevocationErrorResponse, CoreTokenIntrospectionResponse, CoreTokenType,
    },
};
use thiserror::Error;

pub use claims::Identity;
use claims::{Claims, OtherClaims};

/// How long a started sign-in may take, from the portal's redirect to the callback.
const FLOW_LIFETIME: Duration = Duration::from_secs(600);
/// Sign-ins under way at once; beyond this the oldest are dropped (a device that
/// opens the login page in a loop cannot grow the agent's memory).
const MAX_PENDING: usize = 10_000;
/// Every request to a provider gives up after this.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

type TokenFields = IdTokenFields<
    OtherClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type OidcIdToken = IdToken<
    OtherClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type OidcClient = Client<
    OtherClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    StandardTokenResponse<TokenFields, CoreTokenType>,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// One identity provider (`[[idp]]`), with its client secret read.
#[derive(Clone, Debug)]
pub struct ProviderSettings {
    /// The IdP name sessions record.
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: String,
    pub scopes: Vec<String>,
    pub user_claim: String,
    pub groups_claim: String,
    /// Ask for a fresh login (`prompt=login`, `max_age=0`) and refuse a token whose
    /// authentication is older than the flow.
    pub force_interaction: bool,
    /// PEM certificates to trust for the provider, besides the system's.
    pub ca_pem: Option<Vec<u8>>,
}

#[derive(Debug, Error)]
pub enum SignInError {
    #[error("no identity provider is named {name:?}")]
    UnknownProvider { name: String },
    #[error("identity provider {idp}: {cause}")]
    Unreachable { idp: String, cause: String },
    #[error("this sign-in is unknown, was already used, or took longer than {} minutes; start again", FLOW_LIFETIME.as_secs() / 60)]
    NoSuchFlow,
    #[error("this sign-in was started by another device; start again from this one")]
    OtherDevice,
    #[error("the identity provider refused the sign-in: {error}")]
    Refused { error: String },
    #[error("the identity provider's answer could not be verified: {cause}")]
    NotVerified { cause: String },
    #[error("the identity provider's token has no {claim} claim")]
    MissingClaim { claim: String },
    #[error(
        "the identity provider did not ask for the password again (authenticated at {auth_time}, before the sign-in began at {started}); sessions reset only on a fresh sign-in"
    )]
    NotInteractive { auth_time: i64, started: i64 },
    #[error("the redirect address {url:?} cannot be used: {cause}")]
    BadRedirect { url: String, cause: String },
}

struct Provider {
    settings: ProviderSettings,
    http: reqwest::Client,
    /// The provider's metadata and keys, discovered on first use and again after a
    /// token failed verification (its keys may have rotated).
    client: tokio::sync::Mutex<Option<Arc<OidcClient>>>,
}

/// A sign-in under way: what its callback must match.
struct Pending {
    device: IpAddr,
    provider: usize,
    verifier: PkceCodeVerifier,
    nonce: Nonce,
    /// Unix time the flow began (forced interaction refuses older authentications).
    started: i64,
    expires: Instant,
}

pub struct SignIn {
    providers: Vec<Provider>,
    redirect: RedirectUrl,
    pending: Mutex<HashMap<String, Pending>>,
}

impl SignIn {
    /// Sign-ins through `providers`, which send browsers back to `redirect_uri`.
    pub fn new(providers: Vec<ProviderSettings>, redirect_uri: &str) -> Result<Self, SignInError> {
        let redirect =
            RedirectUrl::new(redirect_uri.to_string()).map_err(|e| SignInError::BadRedirect {
                url: redirect_uri.to_string(),
                cause: e.to_string(),
            })?;
        let providers = providers
            .into_iter()
            .map(Provider::new)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            providers,
            redirect,
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// The providers' names, in config order.
    pub fn names(&self) -> Vec<&str> {
        self.providers
            .iter()
            .map(|p| p.settings.name.as_str())
            .collect()
    }

    /// Starts a sign-in for `device` through provider `idp`: the address to send its
    /// browser to.
    pub async fn start(&self, device: IpAddr, idp: &str) -> Result<String, SignInError> {
        let index = self
            .providers
            .iter()
            .position(|p| p.settings.name == idp)
            .ok_or_else(|| SignInError::UnknownProvider {
                name: idp.to_string(),
            })?;
        let provider = &self.providers[index];
        let client = provider.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let client = client
            .as_ref()
            .clone()
            .set_redirect_uri(self.redirect.clone());
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in provider.settings.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        if provider.settings.force_interaction {
            request = request
                .add_prompt(CoreAuthPrompt::Login)
                .set_max_age(Duration::ZERO);
        }
        let (url, state, nonce) = request.url();
        self.remember(
            state.secret().clone(),
            Pending {
                device,
                provider: index,
                verifier,
                nonce,
                started: time::OffsetDateTime::now_utc().unix_timestamp(),
                expires: Instant::now() + FLOW_LIFETIME,
            },
        );
        Ok(url.to_string())
    }

    /// Finishes the sign-in `state` for `device` with the provider's `code`: the
    /// provider's name and who signed in. The state is used up whatever the outcome.
    pub async fn finish(
        &self,
        device: IpAddr,
        state: &str,
        code: &str,
    ) -> Result<(String, Identity), SignInError> {
        let pending = self.take(state, device)?;
        let provider = &self.providers[pending.provider];
        let client = provider.client().await?;
        let client = client
            .as_ref()
            .clone()
            .set_redirect_uri(self.redirect.clone());
        let exchange = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| provider.unreachable(e.to_string()))?
            .set_pkce_verifier(pending.verifier);
        let response =
            exchange
                .request_async(&provider.http)
                .await
                .map_err(|e| SignInError::Refused {
                    error: e.to_string(),
                })?;
        let token = response
            .id_token()
            .ok_or_else(|| SignInError::MissingClaim {
                claim: "id_token".to_string(),
            })?;
        let claims = verified_claims(token, &client.id_token_verifier(), &pending.nonce)
            .inspect_err(|_| provider.forget())?;
        let settings = &provider.settings;
        let not_before = settings.force_interaction.then_some(pending.started);
        let identity = claims.identity(&settings.user_claim, &settings.groups_claim, not_before)?;
        Ok((settings.name.clone(), identity))
    }

    /// Ends the sign-in `state` of `device` without a code (the user cancelled, or the
    /// provider refused): its state is used up.
    pub fn abandon(&self, device: IpAddr, state: &str) {
        let _ = self.take(state, device);
    }

    fn remember(&self, state: String, pending: Pending) {
        let mut flows = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        flows.retain(|_, p| p.expires > now);
        if flows.len() >= MAX_PENDING
            && let Some(oldest) = flows
                .iter()
                .min_by_key(|(_, p)| p.expires)
                .map(|(k, _)| k.clone())
        {
            flows.remove(&oldest);
        }
        flows.insert(state, pending);
    }

    /// The flow `state` names, removed: a state is good for one callback, from the
    /// device that started it (another device's attempt leaves it to its owner).
    fn take(&self, state: &str, device: IpAddr) -> Result<Pending, SignInError> {
        let mut flows = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        match flows.get(state) {
            Some(p) if p.device != device => return Err(SignInError::OtherDevice),
            Some(_) => {}
            None => return Err(SignInError::NoSuchFlow),
        }
        match flows.remove(state) {
            Some(p) if p.expires > Instant::now() => Ok(p),
            _ => Err(SignInError::NoSuchFlow),
        }
    }
}

impl Provider {
    fn new(settings: ProviderSettings) -> Result<Self, SignInError> {
        let mut http = reqwest::Client::builder()
            // The crate follows no redirect on its own requests (SSRF).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(PROVIDER_TIMEOUT);
        if let Some(pem) = &settings.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                SignInError::Unreachable {
                    idp: settings.name.clone(),
                    cause: format!("ca_file: {e}"),
                }
            })?;
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build().map_err(|e| SignInError::Unreachable {
            idp: settings.name.clone(),
            cause: e.to_string(),
        })?;
        Ok(Self {
            settings,
            http,
            client: tokio::sync::Mutex::new(None),
        })
    }

    fn unreachable(&self, cause: String) -> SignInError {
        SignInError::Unreachable {
            idp: self.settings.name.clone(),
            cause,
        }
    }

    /// The client, discovering the provider first if needed.
    async fn client(&self) -> Result<Arc<OidcClient>, SignInError> {
        let mut cached = self.client.lock().await;
        if let Some(client) = cached.as_ref() {
            return Ok(Arc::clone(client));
        }
        let issuer = IssuerUrl::new(self.settings.issuer.clone())
            .map_err(|e| self.unreachable(e.to_string()))?;
        let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
            .await
            .map_err(|e| self.unreachable(error_chain(&e)))?;
        let client = Arc::new(OidcClient::from_provider_metadata(
            metadata,
            ClientId::new(self.settings.client_id.clone()),
            Some(ClientSecret::new(self.settings.client_secret.clone())),
        ));
        *cached = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Drops the discovered metadata, so the next sign-in fetches it (and the keys)
    /// again.
    fn forget(&self) {
        if let Ok(mut cached) = self.client.try_lock() {
            *cached = None;
        }
    }
}

/// The claims of an ID token, once the crate has verified it: its signature against
/// the provider's keys, its issuer, that this agent is its audience, that it has not
/// expired, and its nonce.
fn verified_claims(
    token: &OidcIdToken,
    verifier: &IdTokenVerifier<'_, CoreJsonWebKey>,
    nonce: &Nonce,
) -> Result<Claims, SignInError> {
    let verified = token
        .claims(verifier, nonce)
        .map_err(|e| SignInError::NotVerified {
            cause: e.to_string(),
        })?;
    Ok(Claims {
        sub: verified.subject().to_string(),
        email: verified.email().map(|e| e.to_string()),
        preferred_username: verified.preferred_username().map(|u| u.to_string()),
        name: verified
            .name()
            .and_then(|n| n.get(None))
            .map(|n| n.to_string()),
        auth_time: verified.auth_time().map(|t| t.timestamp()),
        other: verified.additional_claims().0.clone(),
    })
}

/// An error with its causes, for a log line or a page.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod token_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn signin() -> SignIn {
        SignIn::new(Vec::new(), "http://198.18.0.1:8511/callback").unwrap()
    }

    fn pending(device: &str, lifetime: Duration) -> Pending {
        Pending {
            device: device.parse().unwrap(),
            provider: 0,
            verifier: PkceCodeVerifier::new("v".repeat(43)),
            nonce: Nonce::new("n".into()),
            started: 0,
            expires: Instant::now() + lifetime,
        }
    }

    #[test]
    fn a_state_is_taken_once_and_only_by_its_device() {
        let s = signin();
        let device: IpAddr = "198.18.1.10".parse().unwrap();
        let other: IpAddr = "198.18.1.11".parse().unwrap();
        s.remember("st".into(), pending("198.18.1.10", FLOW_LIFETIME));
        // Another device cannot use it, nor use it up.
        assert!(matches!(s.take("st", other), Err(SignInError::OtherDevice)));
        assert!(s.take("st", device).is_ok());
        assert!(matches!(s.take("st", device), Err(SignInError::NoSuchFlow)));
        assert!(matches!(
            s.take("never", device),
            Err(SignInError::NoSuchFlow)
        ));
    }

    #[test]
    fn a_cancelled_sign_in_uses_its_state_up_only_from_its_device() {
        let s = signin();
        let device: IpAddr = "198.18.1.10".parse().unwrap();
        s.remember("st".into(), pending("198.18.1.10", FLOW_LIFETIME));
        s.abandon("198.18.1.11".parse().unwrap(), "st");
        s.abandon(device, "st");
        assert!(matches!(s.take("st", device), Err(SignInError::NoSuchFlow)));
        s.remember("kept".into(), pending("198.18.1.10", FLOW_LIFETIME));
        s.abandon("198.18.1.11".parse().unwrap(), "kept");
        assert!(
            s.take("kept", device).is_ok(),
            "another device cannot cancel it"
        );
    }

    #[test]
    fn an_old_state_is_refused_and_the_pending_set_is_bounded() {
        let s = signin();
        let device: IpAddr = "198.18.1.10".parse().unwrap();
        s.remember("old".into(), pending("198.18.1.10", Duration::ZERO));
        assert!(matches!(
            s.take("old", device),
            Err(SignInError::NoSuchFlow)
        ));
        for i in 0..MAX_PENDING + 10 {
            s.remember(format!("s{i}"), pending("198.18.1.10", FLOW_LIFETIME));
        }
        assert_eq!(s.pending.lock().unwrap().len(), MAX_PENDING);
    }

    #[test]
    fn a_bad_redirect_address_is_refused() {
        assert!(matches!(
            SignIn::new(Vec::new(), "not a url"),
            Err(SignInError::BadRedirect { .. })
        ));
    }
}
