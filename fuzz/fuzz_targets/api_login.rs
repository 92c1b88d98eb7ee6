//! A `POST /v1/sessions` body, as any caller of the API may send it: read into a login
//! request or refused with a 400, then held to the login rules against no session and
//! against a session of another user. Nothing panics, and a login the rules accept
//! records exactly the device and user asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sessiongate::{api::server::login_request, clock::ClockPair, sessions};

fuzz_target!(|body: &[u8]| {
    let Ok(request) = login_request(body) else {
        return;
    };
    let clock = ClockPair::now();
    if let Ok(record) = sessions::plan_login(None, &request, &clock, "fuzz") {
        assert_eq!((record.ip, &record.user), (request.ip, &request.user));
        let other = sessions::LoginRequest {
            user: format!("other-{}", request.user),
            ..request.clone()
        };
        assert!(
            sessions::plan_login(Some(record.enrolled()), &other, &clock, "fuzz").is_err(),
            "another user took a bound device"
        );
    }
});
