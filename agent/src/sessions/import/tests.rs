use super::*;

fn at(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap()
}

fn messages(parsed: &ParsedImport) -> Vec<String> {
    parsed.errors.iter().map(ToString::to_string).collect()
}

#[test]
fn json_lines_parse_with_comments_blank_lines_and_a_default_idp() {
    let parsed = parse(
        "# exported from the IdP\n\
         {\"ip\":\"198.18.1.10\",\"user\":\"alice@example.com\",\"idp\":\"okta\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
         \n\
         {\"ip\": \"2001:db8::20\", \"user\": \"bob@example.com\", \"authenticated_at\": \"2026-11-23T10:30:00+01:00\"}\r\n\
         {\"ip\":\"198.18.1.30\",\"user\":\"carol@example.com\",\"idp\":null,\"authenticated_at\":\"2026-11-23T09:30:00.5Z\"}\n",
    );
    assert_eq!(parsed.errors, [], "{:?}", messages(&parsed));
    assert_eq!(
        parsed.records,
        [
            ImportRecord {
                line: 2,
                ip: "198.18.1.10".parse().unwrap(),
                user: "alice@example.com".into(),
                idp: "okta".into(),
                authenticated_at: at("2026-11-23T09:30:00Z"),
                groups: vec![],
            },
            ImportRecord {
                line: 4,
                ip: "2001:db8::20".parse().unwrap(),
                user: "bob@example.com".into(),
                idp: DEFAULT_IDP.into(),
                authenticated_at: at("2026-11-23T09:30:00Z"),
                groups: vec![],
            },
            ImportRecord {
                line: 5,
                ip: "198.18.1.30".parse().unwrap(),
                user: "carol@example.com".into(),
                idp: DEFAULT_IDP.into(),
                authenticated_at: at("2026-11-23T09:30:00.5Z"),
                groups: vec![],
            },
        ]
    );
}

#[test]
fn groups_come_as_a_json_array_or_a_fifth_csv_column() {
    let json = parse(
        "{\"ip\":\"198.18.1.10\",\"user\":\"a@example.com\",\"authenticated_at\":\"2026-11-23T09:30:00Z\",\"groups\":[\"finance\",\"staff\"]}\n",
    );
    assert_eq!(json.errors, [], "{:?}", messages(&json));
    assert_eq!(json.records[0].groups, ["finance", "staff"]);
    let csv = parse(
        "ip,user,idp,authenticated_at,groups\n\
         198.18.1.10,a@example.com,okta,2026-11-23T09:30:00Z,finance; staff\n\
         198.18.1.11,b@example.com,okta,2026-11-23T09:30:00Z,\n\
         198.18.1.12,c@example.com,okta,2026-11-23T09:30:00Z\n",
    );
    assert_eq!(csv.errors, [], "{:?}", messages(&csv));
    let groups: Vec<&[String]> = csv.records.iter().map(|r| r.groups.as_slice()).collect();
    assert_eq!(
        groups,
        [&["finance".to_string(), "staff".to_string()][..], &[], &[]]
    );
    let bad = parse("198.18.1.10,a@example.com,okta,2026-11-23T09:30:00Z,fin\u{202e}ance\n");
    assert_eq!(bad.records, []);
    assert!(
        messages(&bad)[0].starts_with("line 1: group"),
        "{:?}",
        messages(&bad)
    );
}

#[test]
fn csv_parses_with_or_without_a_header() {
    let body = "198.18.1.10,alice@example.com,okta,2026-11-23T09:30:00Z\n\
                # a comment\n\
                2001:db8::20, bob@example.com ,,2026-11-23T10:30:00+01:00\n";
    let without = parse(body);
    assert_eq!(without.errors, [], "{:?}", messages(&without));
    assert_eq!(without.records.len(), 2);
    assert_eq!(without.records[0].line, 1);
    assert_eq!(without.records[0].idp, "okta");
    assert_eq!(without.records[1].line, 3);
    assert_eq!(without.records[1].user, "bob@example.com");
    assert_eq!(without.records[1].idp, DEFAULT_IDP);
    assert_eq!(
        without.records[1].authenticated_at,
        at("2026-11-23T09:30:00Z")
    );

    let with = parse(&format!(
        "\n# sessions\nip,user,idp,authenticated_at\n{body}"
    ));
    assert_eq!(with.errors, [], "{:?}", messages(&with));
    assert_eq!(
        with.records.iter().map(|r| r.line).collect::<Vec<_>>(),
        [4, 6]
    );
    assert_eq!(with.records[0].ip, without.records[0].ip);
}

#[test]
fn every_bad_line_is_reported_with_its_number() {
    let parsed = parse(
        "ip,user,idp,authenticated_at\n\
         198.18.1.10,alice@example.com,okta,2026-11-23T09:30:00Z\n\
         198.18.1.300,bob@example.com,okta,2026-11-23T09:30:00Z\n\
         198.18.1.12,carol@example.com,okta\n\
         198.18.1.13,,okta,2026-11-23T09:30:00Z\n\
         198.18.1.14,dave@example.com,okta,2026-11-23T09:30:00Z\n\
         198.18.1.15,erin@example.com,okta,yesterday\n\
         198.18.1.16,frank@example.com,okta,2026-11-23 09:30\n\
         198.18.1.17,\"grace@example.com\",okta,2026-11-23T09:30:00Z\n\
         198.18.1.18,heidi@example.com,bad\u{7}idp,2026-11-23T09:30:00Z\n\
         {\"ip\":\"198.18.1.19\"}\n",
    );
    assert_eq!(
        messages(&parsed),
        [
            "line 3: ip \"198.18.1.300\" is not an IPv4 or IPv6 address",
            "line 4: expected 4 or 5 comma-separated fields (ip,user,idp,authenticated_at,groups), found 3",
            "line 5: missing field \"user\"",
            "line 7: authenticated_at \"yesterday\" is not an RFC 3339 time like 2026-11-23T09:30:00Z",
            "line 8: authenticated_at \"2026-11-23 09:30\" is not an RFC 3339 time like 2026-11-23T09:30:00Z",
            "line 9: CSV fields cannot be quoted; write them bare, or use JSON lines for a name with a comma",
            "line 10: idp \"bad\\u{7}idp\" is invalid: it contains U+0007 (at byte 3), a control or invisible character; names may hold only visible characters",
            "line 11: a JSON object in a CSV file (the first line decides the format, and it was CSV)",
        ]
    );
    // The good lines still parse, for --skip-bad.
    assert_eq!(
        parsed.records.iter().map(|r| r.line).collect::<Vec<_>>(),
        [2, 6]
    );
}

#[test]
fn bad_json_lines_are_reported_with_their_numbers() {
    let parsed = parse(
        "{\"ip\":\"198.18.1.10\",\"user\":\"alice@example.com\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
         {\"ip\":\"198.18.1.11\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
         {\"ip\":\"198.18.1.12\",\"user\":\"bob@example.com\"}\n\
         {\"ip\":\"198.18.1.13\",\"user\":\"carol@example.com\",\"idP\":\"okta\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
         {\"ip\":\"198.18.1.14\",\"user\":\"dave@example.com\",\"authenticated_at\":\n\
         198.18.1.15,erin@example.com,okta,2026-11-23T09:30:00Z\n\
         {\"ip\":42,\"user\":\"frank@example.com\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
         {\"ip\":\"198.18.1.17\",\"user\":\"two words\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n",
    );
    let got = messages(&parsed);
    assert_eq!(
        parsed.errors.iter().map(|e| e.line).collect::<Vec<_>>(),
        [2, 3, 4, 5, 6, 7, 8],
        "{got:#?}"
    );
    assert_eq!(got[0], "line 2: missing field \"user\"");
    assert_eq!(got[1], "line 3: missing field \"authenticated_at\"");
    assert!(got[2].contains("unknown field `idP`"), "{}", got[2]);
    assert!(
        got[3].starts_with("line 5: not a JSON object") && got[3].contains("column"),
        "{}",
        got[3]
    );
    assert!(!got[3].contains("line 1 column"), "{}", got[3]);
    assert!(
        got[4].starts_with("line 6: not a JSON object"),
        "{}",
        got[4]
    );
    assert!(got[5].contains("invalid type"), "{}", got[5]);
    assert_eq!(
        got[6],
        "line 8: user \"two words\" is invalid: it contains whitespace (at byte 3); write it as one word"
    );
    assert_eq!(parsed.records.len(), 1);
}

#[test]
fn a_duplicate_ip_is_an_error_on_the_later_line() {
    let parsed = parse(
        "198.18.1.10,alice@example.com,okta,2026-11-23T09:30:00Z\n\
         198.18.1.11,bob@example.com,okta,not-a-time\n\
         198.18.1.10,alice@example.com,okta,2026-11-23T10:30:00Z\n\
         198.18.1.11,bob@example.com,okta,2026-11-23T10:30:00Z\n",
    );
    assert_eq!(
        messages(&parsed),
        [
            "line 2: authenticated_at \"not-a-time\" is not an RFC 3339 time like 2026-11-23T09:30:00Z",
            "line 3: ip 198.18.1.10 already appears on line 1 (one session per device)",
            // A device counts as seen even when its first line is bad.
            "line 4: ip 198.18.1.11 already appears on line 2 (one session per device)",
        ]
    );
    assert_eq!(parsed.records.len(), 1);
    assert_eq!(
        parsed.records[0].authenticated_at,
        at("2026-11-23T09:30:00Z")
    );
}

#[test]
fn a_wrong_csv_header_is_refused_and_only_the_first_line_can_be_one() {
    let parsed = parse(
        "ip,user,authenticated_at\n\
         198.18.1.10,alice@example.com,okta,2026-11-23T09:30:00Z\n\
         ip,user,idp,authenticated_at\n",
    );
    assert_eq!(
        messages(&parsed),
        [
            "line 1: header \"ip,user,authenticated_at\" should be ip,user,idp,authenticated_at,groups (these columns, in this order; groups may be left out)",
            "line 3: ip \"ip\" is not an IPv4 or IPv6 address",
        ]
    );
    assert_eq!(parsed.records.len(), 1);
}

#[test]
fn an_empty_file_has_nothing_and_no_errors() {
    assert_eq!(parse(""), ParsedImport::default());
    assert_eq!(parse("\n# nothing\n  \n"), ParsedImport::default());
}

#[test]
fn one_device_has_one_spelling_in_csv_and_json_lines() {
    // An IPv4-mapped address is the IPv4 device, so a second line for it is a
    // duplicate, not a second device.
    let csv = parse(
        "198.18.1.2,alice@example.com,okta,2026-11-23T09:30:00Z\n\
         ::ffff:198.18.1.2,mallory@example.com,evil,2026-11-23T09:30:00Z\n\
         ::ffff:198.18.1.3,bob@example.com,okta,2026-11-23T09:30:00Z\n",
    );
    assert_eq!(
        messages(&csv),
        ["line 2: ip 198.18.1.2 already appears on line 1 (one session per device)"]
    );
    assert_eq!(csv.records[1].ip, "198.18.1.3".parse::<IpAddr>().unwrap());
    let json = parse(
        "{\"ip\":\"::ffff:198.18.1.2\",\"user\":\"a\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
         {\"ip\":\"198.18.1.2\",\"user\":\"b\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n",
    );
    assert_eq!(json.records.len(), 1);
    assert_eq!(json.records[0].ip, "198.18.1.2".parse::<IpAddr>().unwrap());
    assert!(messages(&json)[0].contains("already appears on line 1"));
}

#[test]
fn leading_zeros_and_addresses_that_cannot_be_devices_are_refused() {
    let parsed = parse(
        "198.010.2.010,alice@example.com,okta,2026-11-23T09:30:00Z\n\
         224.0.0.1,bob@example.com,okta,2026-11-23T09:30:00Z\n\
         255.255.255.255,carol@example.com,okta,2026-11-23T09:30:00Z\n\
         0.0.0.0,dave@example.com,okta,2026-11-23T09:30:00Z\n\
         ::1,erin@example.com,okta,2026-11-23T09:30:00Z\n\
         ff02::1,frank@example.com,okta,2026-11-23T09:30:00Z\n",
    );
    let got = messages(&parsed);
    assert_eq!(
        got[0],
        "line 1: ip \"198.010.2.010\" has a leading zero in an IPv4 part, which some tools read as octal and others as decimal; write each part without leading zeros (e.g. 198.10.2.10)"
    );
    assert_eq!(
        got[1],
        "line 2: ip 224.0.0.1 cannot be a device: it is a multicast address"
    );
    assert!(got[2].contains("broadcast"), "{}", got[2]);
    assert!(got[3].contains("unspecified"), "{}", got[3]);
    assert!(got[4].contains("loopback"), "{}", got[4]);
    assert!(got[5].contains("multicast"), "{}", got[5]);
    assert!(parsed.records.is_empty());
}

#[test]
fn invisible_characters_in_names_are_refused_in_both_formats() {
    let parsed = parse(
        "198.18.1.2,alice\u{202e}moc.elpmaxe,okta,2026-11-23T09:30:00Z\n\
         198.18.1.3,bob@example.com,ok\u{200b}ta,2026-11-23T09:30:00Z\n",
    );
    let got = messages(&parsed);
    assert!(
        got[0].contains("user \"alice\\u{202e}moc.elpmaxe\" is invalid: it contains U+202E"),
        "{}",
        got[0]
    );
    assert!(
        got[1].contains("idp \"ok\\u{200b}ta\" is invalid: it contains U+200B"),
        "{}",
        got[1]
    );
    let long = "a".repeat(257);
    let parsed = parse(&format!(
        "{{\"ip\":\"198.18.1.2\",\"user\":\"al\\u001bice\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}}\n\
         {{\"ip\":\"198.18.1.3\",\"user\":\"{long}\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}}\n\
         {{\"ip\":\"198.18.1.4\",\"user\":\"\\ufeffbob\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}}\n"
    ));
    let got = messages(&parsed);
    assert!(got[0].contains("U+001B"), "{}", got[0]);
    assert!(
        got[1].contains("257 bytes long; the limit is 256"),
        "{}",
        got[1]
    );
    assert!(
        got[1].len() < 200,
        "a long name is not repeated whole: {}",
        got[1]
    );
    assert!(got[2].contains("U+FEFF"), "{}", got[2]);
    assert!(parsed.records.is_empty());
    for message in got {
        assert!(
            !message.contains(['\n', '\u{1b}', '\u{feff}']),
            "{message:?}"
        );
    }
}

#[test]
fn a_file_parsed_in_two_halves_reads_as_it_does_line_by_line() {
    // Duplicates across the cut (of good and of bad lines, and repeated within the
    // second half), bad lines on both sides, a header, comments and blank lines: cut
    // after every line, the result is the uncut one.
    let csv = "# devices\n\
        ip,user,idp,authenticated_at,groups\n\
        198.18.1.10,alice@example.com,okta,2026-11-23T09:30:00Z,finance\n\
        198.18.1.11,bob@example.com,okta,not-a-time\n\
        \n\
        198.18.1.12,carol@example.com,,2026-11-23T09:30:00Z\n\
        198.18.1.10,alice@example.com,okta,2026-11-23T10:30:00Z\n\
        198.18.1.13,bad name,okta,2026-11-23T09:30:00Z\n\
        198.18.1.11,bob@example.com,okta,2026-11-23T10:30:00Z\n\
        ip,user,idp,authenticated_at\n\
        198.18.1.12,carol@example.com,,also-not-a-time\n\
        198.18.1.10,mallory@example.com,okta,2026-11-23T10:30:00Z\n\
        2001:db8::20,dave@example.com,okta,2026-11-23T09:30:00Z,a;b\r\n\
        198.18.1.13,erin@example.com,okta,2026-11-23T09:30:00Z\n";
    let json = "{\"ip\":\"198.18.1.10\",\"user\":\"alice@example.com\",\"authenticated_at\":\"2026-11-23T09:30:00Z\"}\n\
        # a comment\n\
        {\"ip\":\"198.18.1.11\",\"user\":\"bob@example.com\"}\n\
        {\"ip\":\"198.18.1.10\",\"user\":\"alice@example.com\",\"authenticated_at\":\"2026-11-23T10:30:00Z\"}\n\
        {\"ip\":\"198.18.1.11\",\"user\":\"bob@example.com\",\"authenticated_at\":\"2026-11-23T10:30:00Z\"}\n\
        {\"ip\":\"198.18.1.12\",\"user\":\"carol@example.com\",\"authenticated_at\":\"2026-11-23T10:30:00Z\"}\n";
    for text in [csv, json] {
        let whole = parse_split(text, None);
        assert!(
            !whole.records.is_empty() && whole.errors.len() >= 2,
            "{whole:#?}"
        );
        let cuts = text.match_indices('\n').map(|(i, _)| i + 1);
        for cut in cuts {
            assert_eq!(parse_split(text, Some(cut)), whole, "cut at byte {cut}");
        }
    }
    // Large files are cut: the same answer through `parse`.
    let many: String = (0..40_000u32)
        .map(|i| {
            let device = std::net::Ipv4Addr::from(0xc612_0000 + i % 30_000);
            format!("{device},u{i}@example.com,okta,2026-11-23T09:30:00Z\n")
        })
        .collect();
    assert!(many.len() > SPLIT_ABOVE);
    let parsed = parse(&many);
    assert_eq!(parsed, parse_split(&many, None));
    assert_eq!(parsed.records.len(), 30_000);
    assert_eq!(parsed.errors.len(), 10_000);
}
