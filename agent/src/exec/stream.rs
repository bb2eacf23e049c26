//! Live output: while a leased action runs, its stdout and stderr files are
//! read as they grow and sent to the coordinator (`OutputChunk`), when the
//! lease asks for it (`Lease.stream_output`).
//!
//! Bounded so a chatty action cannot crowd the fleet stream: at most
//! [`PER_TICK`] bytes per stream every [`TICK`] (32 KiB/s each), and a
//! stream more than [`MAX_BEHIND`] bytes behind skips to its newest bytes
//! (the chunk's offset says where they start; the coordinator never fills
//! the gap with anything but the final blob). A chunk that finds the
//! agent's outbox half full is dropped the same way, so results, stage
//! changes and exits always have room. It stops when the lease ends: the
//! result's stdout and stderr blobs hold all of the output.
//!
//! Only what the command writes to the files while it runs streams: a
//! persistent worker's response, for one, arrives with the result.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use outpost_proto::fleet::{self, OutputStream};

use super::Events;

/// How often the files are looked at.
pub const TICK: Duration = Duration::from_millis(250);
/// Bytes of one stream sent per tick at most.
pub const PER_TICK: u64 = 8 << 10;
/// Unsent bytes of one stream past which the oldest are skipped.
pub const MAX_BEHIND: u64 = 256 << 10;

/// One output file followed from `offset`.
struct Tail<'a> {
    path: &'a Path,
    stream: OutputStream,
    offset: u64,
}

impl Tail<'_> {
    /// The next chunk to send, if the file grew; moves past it.
    fn next(&mut self, lease_id: &str) -> Option<fleet::OutputChunk> {
        let mut file = std::fs::File::open(self.path).ok()?;
        let len = file.metadata().ok()?.len();
        if len <= self.offset {
            return None;
        }
        if len - self.offset > MAX_BEHIND {
            // Too far behind to catch up within the bound: the newest
            // bytes are what a person following wants.
            self.offset = len - PER_TICK;
        }
        let want = (len - self.offset).min(PER_TICK);
        file.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut data = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
        file.take(want).read_to_end(&mut data).ok()?;
        if data.is_empty() {
            return None;
        }
        let chunk = fleet::OutputChunk {
            lease_id: lease_id.to_owned(),
            stream: self.stream as i32,
            offset: self.offset,
            data: Bytes::from(data),
        };
        self.offset += chunk.data.len() as u64;
        Some(chunk)
    }
}

/// Where output chunks go: queued towards the coordinator, or dropped
/// when the stream has no room for them.
pub type OutputSink = std::sync::Arc<dyn Fn(fleet::OutputChunk) + Send + Sync>;

/// Follows `stdout` and `stderr` in the background, when `lease` asks for
/// it and `events` has somewhere to send the chunks; until the guard is
/// dropped (the lease ends).
pub fn follow(
    lease: &fleet::Lease,
    stdout: &Path,
    stderr: &Path,
    events: &dyn Events,
) -> Option<tokio_util::sync::DropGuard> {
    if !lease.stream_output {
        return None;
    }
    let sink = events.output_sink()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let (lease_id, stdout, stderr) = (lease.lease_id.clone(), stdout.to_owned(), stderr.to_owned());
    let stopped = stop.clone();
    tokio::spawn(async move {
        let mut tails = [
            Tail {
                path: &stdout,
                stream: OutputStream::Stdout,
                offset: 0,
            },
            Tail {
                path: &stderr,
                stream: OutputStream::Stderr,
                offset: 0,
            },
        ];
        // The first look is a tick in: an action shorter than that (most
        // of them) never has its files opened here.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + TICK, TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stopped.cancelled() => return,
            }
            for tail in &mut tails {
                if let Some(chunk) = tail.next(&lease_id) {
                    sink(chunk);
                }
            }
        }
    });
    Some(stop.drop_guard())
}

/// A sink onto the agent's outbox that leaves its second half to what
/// must get through (results, stage changes, exits): a chunk that finds
/// the outbox half full is dropped.
pub fn outbox_sink(outbox: tokio::sync::mpsc::Sender<fleet::agent_message::Kind>) -> OutputSink {
    std::sync::Arc::new(move |chunk| {
        if outbox.capacity() > outbox.max_capacity() / 2 {
            let _ = outbox.try_send(fleet::agent_message::Kind::OutputChunk(chunk));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_sends_what_is_new_and_skips_when_far_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stdout");
        std::fs::write(&path, "one\n").expect("write");
        let mut tail = Tail {
            path: &path,
            stream: OutputStream::Stdout,
            offset: 0,
        };
        let first = tail.next("l").expect("a chunk");
        assert_eq!((first.offset, &first.data[..]), (0, &b"one\n"[..]));
        assert!(tail.next("l").is_none(), "nothing new");
        std::fs::write(&path, "one\ntwo\n").expect("write");
        let second = tail.next("l").expect("a chunk");
        assert_eq!((second.offset, &second.data[..]), (4, &b"two\n"[..]));
        // Far behind: the oldest unsent bytes are skipped, and the chunk
        // says where its bytes start.
        let big = vec![b'x'; usize::try_from(MAX_BEHIND * 2).expect("fits")];
        std::fs::write(&path, &big).expect("write");
        let skipped = tail.next("l").expect("a chunk");
        assert_eq!(skipped.offset, MAX_BEHIND * 2 - PER_TICK);
        assert_eq!(skipped.data.len() as u64, PER_TICK);
        assert!(tail.next("l").is_none());
        // No file (yet): nothing, and no error.
        let mut missing = Tail {
            path: &dir.path().join("absent"),
            stream: OutputStream::Stderr,
            offset: 0,
        };
        assert!(missing.next("l").is_none());
    }
}
