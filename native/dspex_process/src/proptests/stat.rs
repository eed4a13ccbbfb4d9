//! The `/proc/PID/stat` parser against any command name: the kernel writes `comm` raw, so
//! it may hold `)`, `(`, spaces, newlines, a `Z`, bytes that are not UTF-8.

use super::{bytes_with, check};
use crate::proc_facts::{parse_stat, ProcessState, Stat};
use proptest::collection::vec;
use proptest::prelude::*;

/// A command name of up to 64 bytes, rich in the bytes that can fool a parser.
fn comm() -> impl Strategy<Value = Vec<u8>> {
    bytes_with(b") (\nZ\t0123456789-", b"", 0..65)
}

#[derive(Debug, Clone)]
struct Line {
    comm: Vec<u8>,
    state: char,
    ppid: i32,
    pgid: i32,
    sid: i32,
    utime: u64,
    stime: u64,
    threads: u64,
    start_time: u64,
    rss_pages: u64,
    /// Every other field, as the kernel may write it (some are signed, e.g. tpgid -1).
    filler: Vec<i64>,
}

fn line() -> impl Strategy<Value = Line> {
    (
        comm(),
        prop::sample::select("RSDTtZXxIWKP".chars().collect::<Vec<_>>()),
        (0..=i32::MAX, 0..=i32::MAX, 0..=i32::MAX),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
        vec(any::<i64>(), 40),
    )
        .prop_map(
            |(
                comm,
                state,
                (ppid, pgid, sid),
                (utime, stime, threads, start_time, rss_pages),
                filler,
            )| Line {
                comm,
                state,
                ppid,
                pgid,
                sid,
                utime,
                stime,
                threads,
                start_time,
                rss_pages,
                filler,
            },
        )
}

impl Line {
    /// The line as the kernel writes it (fields 1 to 52); also the offset where the rss
    /// field (24) starts.
    fn render(&self) -> (Vec<u8>, usize) {
        let f = |i: usize| self.filler[i].to_string();
        let mut out = format!("{} (", self.filler[0].unsigned_abs()).into_bytes();
        out.extend_from_slice(&self.comm);
        let mut fields = vec![
            ")".to_string(),
            self.state.to_string(),
            self.ppid.to_string(),
            self.pgid.to_string(),
            self.sid.to_string(),
        ];
        // 7 tty_nr .. 13 cmajflt
        fields.extend((1..=7).map(f));
        fields.push(self.utime.to_string()); // 14
        fields.push(self.stime.to_string()); // 15
        fields.extend((8..=11).map(f)); // 16 cutime .. 19 nice
        fields.push(self.threads.to_string()); // 20
        fields.push(f(12)); // 21 itrealvalue
        fields.push(self.start_time.to_string()); // 22
        fields.push(f(13)); // 23 vsize
        let head = fields.join(" ");
        out.extend_from_slice(head.as_bytes());
        out.push(b' ');
        let rss_at = out.len();
        out.extend_from_slice(self.rss_pages.to_string().as_bytes()); // 24
        for i in 14..=39 {
            out.push(b' ');
            out.extend_from_slice(f(i).as_bytes());
        }
        out.push(b'\n');
        (out, rss_at)
    }

    fn expected(&self) -> Stat {
        Stat {
            comm: String::from_utf8_lossy(&self.comm).into_owned(),
            state: ProcessState::from_char(self.state),
            ppid: self.ppid,
            pgid: self.pgid,
            sid: self.sid,
            utime: self.utime,
            stime: self.stime,
            threads: self.threads,
            start_time: self.start_time,
            rss_pages: self.rss_pages,
        }
    }
}

#[test]
fn every_field_is_read_whatever_the_command_name() {
    check("stat: any comm", 3_000, line(), |line| {
        let (bytes, _) = line.render();
        prop_assert_eq!(parse_stat(&bytes), Some(line.expected()));
        Ok(())
    });
}

#[test]
fn a_line_cut_short_is_refused() {
    // A short read that ends before the last field we use (rss, field 24) is never taken
    // for a whole line, wherever it ends after the command name.
    let cut = (line(), any::<prop::sample::Index>());
    check("stat: cut short", 2_000, cut, |(line, at)| {
        let (bytes, rss_at) = line.render();
        let close = bytes.iter().rposition(|b| *b == b')').unwrap();
        let end = close + 1 + at.index(rss_at - close - 1);
        prop_assert_eq!(parse_stat(&bytes[..end]), None);
        Ok(())
    });
}

#[test]
fn any_bytes_never_panic() {
    let bytes = bytes_with(b"() \n0123456789SZ", b"", 0..600);
    check("stat: any bytes", 3_000, bytes, |bytes| {
        if let Some(stat) = parse_stat(&bytes) {
            // Whatever it accepts has a command name between the first ( and the last ).
            let open = bytes.iter().position(|b| *b == b'(').unwrap();
            let close = bytes.iter().rposition(|b| *b == b')').unwrap();
            prop_assert_eq!(stat.comm, String::from_utf8_lossy(&bytes[open + 1..close]));
        }
        Ok(())
    });
}
