//! The marker parser against arbitrary `/proc/PID/environ` contents: it never panics, finds
//! the markers wherever they are among other variables, and takes nothing from malformed
//! ones.

use super::{bytes_with, check};
use crate::identity::ProcessIdentity;
use crate::markers::{self, parse_environ, Markers};
use crate::pid::Pid;
use proptest::collection::vec;
use proptest::prelude::*;

const KEYS: [&str; 6] = [
    markers::OWNER_PID,
    markers::OWNER_START,
    markers::OWNER_PIDNS,
    markers::RUN_ID,
    markers::WORKER_ID,
    markers::FINGERPRINT,
];

/// Bytes without NUL (one environment variable, or a value).
fn text() -> impl Strategy<Value = Vec<u8>> {
    bytes_with(b"DSPEX_=0123456789 -+x", b"\0", 0..40)
}

/// Variables that are not markers: anything, except a recognised marker key followed by `=`.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    let near_miss = (prop::sample::select(KEYS.to_vec()), text()).prop_map(|(key, tail)| {
        // A marker key without `=`, or with something glued to it: never a marker.
        let mut var = key.as_bytes().to_vec();
        var.push(b'X');
        var.extend(tail);
        var
    });
    let bare_key = prop::sample::select(KEYS.to_vec()).prop_map(|key| key.as_bytes().to_vec());
    prop_oneof![4 => text(), 1 => near_miss, 1 => bare_key].prop_filter("a real marker", |var| {
        !KEYS
            .iter()
            .any(|key| var.starts_with(format!("{key}=").as_bytes()))
    })
}

fn markers() -> impl Strategy<Value = Markers> {
    let optional = || proptest::option::of(text());
    (
        2..=i64::from(i32::MAX),
        any::<u64>(),
        proptest::option::of(any::<u64>()),
        optional(),
        optional(),
        optional(),
    )
        .prop_map(
            |(pid, start_time, pid_ns, run_id, worker_id, fingerprint)| {
                let lossy =
                    |v: Option<Vec<u8>>| v.map(|v| String::from_utf8_lossy(&v).into_owned());
                Markers {
                    owner: ProcessIdentity {
                        pid: Pid::new(pid).unwrap(),
                        start_time,
                    },
                    pid_ns,
                    run_id: lossy(run_id),
                    worker_id: lossy(worker_id),
                    fingerprint: lossy(fingerprint),
                }
            },
        )
}

fn environ(vars: &[Vec<u8>], trailing_nul: bool) -> Vec<u8> {
    let mut out = vars.join(&0u8);
    if trailing_nul {
        out.push(0);
    }
    out
}

#[test]
fn any_bytes_never_panic() {
    let bytes = bytes_with(b"DSPEX_OWNER_PID=START\0", b"", 0..800);
    check("markers: any bytes", 3_000, bytes, |bytes| {
        if let Some(m) = parse_environ(&bytes) {
            // Whatever it finds is there, in its own variables.
            let value_of = |key: &str| {
                let prefix = format!("{key}=");
                bytes
                    .split(|b| *b == 0)
                    .filter_map(|var| var.strip_prefix(prefix.as_bytes()))
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect::<Vec<_>>()
            };
            let pid = i64::from(m.owner.pid.as_raw());
            prop_assert!(value_of(markers::OWNER_PID)
                .iter()
                .any(|v| v.parse() == Ok(pid)));
            let start = m.owner.start_time;
            prop_assert!(value_of(markers::OWNER_START)
                .iter()
                .any(|v| v.parse() == Ok(start)));
        }
        Ok(())
    });
}

#[test]
fn markers_are_found_among_any_other_variables() {
    let case = (
        markers(),
        vec(noise(), 0..12),
        any::<prop::sample::Index>(),
        any::<bool>(),
    );
    check(
        "markers: found",
        2_000,
        case,
        |(m, noise, at, trailing_nul)| {
            // The marker variables in order, spread at random places among the noise.
            let mut vars = noise;
            for (key, value) in m.to_env() {
                let mut var = format!("{key}=").into_bytes();
                var.extend_from_slice(value.as_bytes());
                let place = at.index(vars.len() + 1);
                vars.insert(place, var);
            }
            prop_assert_eq!(parse_environ(&environ(&vars, trailing_nul)), Some(m));
            Ok(())
        },
    );
}

/// A value of DSPEX_OWNER_PID that names no process we could own.
fn bad_pid() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop_oneof![i64::MIN..=1, i64::from(i32::MAX) + 1..=i64::MAX]
            .prop_map(|p| p.to_string().into_bytes()),
        text(),
    ]
    .prop_filter("a valid pid", |v| {
        String::from_utf8_lossy(v)
            .parse::<i64>()
            .map_or(true, |p| Pid::new(p).is_err())
    })
}

/// A value of DSPEX_OWNER_START that is not a start time.
fn bad_start() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (i64::MIN..0).prop_map(|t| t.to_string().into_bytes()),
        Just(b"18446744073709551616".to_vec()),
        text(),
    ]
    .prop_filter("a valid start time", |v| {
        String::from_utf8_lossy(v).parse::<u64>().is_err()
    })
}

#[test]
fn malformed_owner_fields_mean_no_markers() {
    // (pid value, start value): None for a missing variable.
    let owner = prop_oneof![
        (bad_pid(), any::<u64>()).prop_map(|(p, s)| (Some(p), Some(s.to_string().into_bytes()))),
        (2..=i64::from(i32::MAX), bad_start())
            .prop_map(|(p, s)| (Some(p.to_string().into_bytes()), Some(s))),
        any::<u64>().prop_map(|s| (None, Some(s.to_string().into_bytes()))),
        (2..=i64::from(i32::MAX)).prop_map(|p| (Some(p.to_string().into_bytes()), None)),
    ];
    let case = (markers(), owner, vec(noise(), 0..8), any::<bool>());
    check(
        "markers: malformed owner",
        2_000,
        case,
        |(m, (pid, start), noise, trailing_nul)| {
            let mut vars = noise;
            for (key, value) in m.to_env() {
                let value = match key {
                    k if k == markers::OWNER_PID => pid.clone(),
                    k if k == markers::OWNER_START => start.clone(),
                    _ => Some(value.into_bytes()),
                };
                if let Some(value) = value {
                    let mut var = format!("{key}=").into_bytes();
                    var.extend(value);
                    vars.push(var);
                }
            }
            prop_assert_eq!(parse_environ(&environ(&vars, trailing_nul)), None);
            Ok(())
        },
    );
}
