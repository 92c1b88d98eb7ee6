//! ID tokens that must not count, verified as the sign-in verifies them: signed by a
//! key the provider does not publish, for another client, expired, or for another
//! flow's nonce. Tokens are made and signed by the `openidconnect` crate itself, with
//! test keys (`testdata/`).

use chrono::{Duration, Utc};
use openidconnect::{
    Audience, ClientId, ClientSecret, EndUserEmail, IdTokenClaims, IssuerUrl, JsonWebKeyId, Nonce,
    PrivateSigningKey, StandardClaims, SubjectIdentifier,
    core::{CoreJsonWebKeySet, CoreJwsSigningAlgorithm, CoreRsaPrivateSigningKey},
};

use super::{OidcIdToken, SignInError, claims::OtherClaims, verified_claims};

const ISSUER: &str = "https://idp.example.com";
const CLIENT: &str = "sessiongate";

fn key(pem: &str) -> CoreRsaPrivateSigningKey {
    CoreRsaPrivateSigningKey::from_pem(pem, Some(JsonWebKeyId::new("k1".into()))).unwrap()
}

fn provider_key() -> CoreRsaPrivateSigningKey {
    key(include_str!("testdata/provider.pem"))
}

/// A token as a provider would send it, changed by `edit`, signed with `signer`.
fn token(
    signer: &CoreRsaPrivateSigningKey,
    edit: impl FnOnce(&mut IdTokenClaims<OtherClaims, openidconnect::core::CoreGenderClaim>),
) -> OidcIdToken {
    let now = Utc::now();
    let mut claims = IdTokenClaims::new(
        IssuerUrl::new(ISSUER.into()).unwrap(),
        vec![Audience::new(CLIENT.into())],
        now + Duration::minutes(5),
        now,
        StandardClaims::new(SubjectIdentifier::new("u-1".into()))
            .set_email(Some(EndUserEmail::new("alice@example.com".into()))),
        OtherClaims::default(),
    )
    .set_nonce(Some(Nonce::new("flow-nonce".into())))
    .set_auth_time(Some(now));
    edit(&mut claims);
    OidcIdToken::new(
        claims,
        signer,
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
        None,
        None,
    )
    .unwrap()
}

fn verify(token: &OidcIdToken, nonce: &str) -> Result<super::claims::Claims, SignInError> {
    let keys = CoreJsonWebKeySet::new(vec![provider_key().as_verification_key()]);
    let verifier = openidconnect::IdTokenVerifier::new_confidential_client(
        ClientId::new(CLIENT.into()),
        ClientSecret::new("secret".into()),
        IssuerUrl::new(ISSUER.into()).unwrap(),
        keys,
    );
    verified_claims(token, &verifier, &Nonce::new(nonce.into()))
}

fn refused(result: Result<super::claims::Claims, SignInError>) -> String {
    match result {
        Err(SignInError::NotVerified { cause }) => cause,
        other => panic!("expected a verification failure, got {other:?}"),
    }
}

#[test]
fn a_good_token_gives_its_claims() {
    let claims = verify(&token(&provider_key(), |_| {}), "flow-nonce").unwrap();
    assert_eq!(claims.email.as_deref(), Some("alice@example.com"));
    assert!(claims.auth_time.is_some());
}

#[test]
fn a_token_signed_by_another_key_is_refused() {
    let other = key(include_str!("testdata/other.pem"));
    let cause = refused(verify(&token(&other, |_| {}), "flow-nonce"));
    assert!(cause.to_lowercase().contains("signature"), "{cause}");
}

#[test]
fn a_token_for_another_client_is_refused() {
    let t = token(&provider_key(), |c| {
        *c = c
            .clone()
            .set_audiences(vec![Audience::new("another-app".into())]);
    });
    let cause = refused(verify(&t, "flow-nonce"));
    assert!(
        cause.contains("audience") || cause.contains("aud"),
        "{cause}"
    );
}

#[test]
fn an_expired_token_is_refused() {
    let t = token(&provider_key(), |c| {
        let past = Utc::now() - Duration::hours(1);
        *c = c
            .clone()
            .set_expiration(past)
            .set_issue_time(past - Duration::minutes(5));
    });
    let cause = refused(verify(&t, "flow-nonce"));
    assert!(cause.to_lowercase().contains("expire"), "{cause}");
}

#[test]
fn a_token_of_another_flow_is_refused() {
    let cause = refused(verify(&token(&provider_key(), |_| {}), "another-nonce"));
    assert!(cause.to_lowercase().contains("nonce"), "{cause}");
}

#[test]
fn a_token_from_another_issuer_is_refused() {
    let t = token(&provider_key(), |c| {
        *c = c
            .clone()
            .set_issuer(IssuerUrl::new("https://evil.example.com".into()).unwrap());
    });
    let cause = refused(verify(&t, "flow-nonce"));
    assert!(cause.to_lowercase().contains("issuer"), "{cause}");
}
