//! What the runs send: a fast random generator, pre-generated write
//! payloads, request identity (ids, revisions, epoch) and the random
//! block-aligned requests of the measured runs.

use bytes::Bytes;
use zebu_proto::replica::{IoRequest, Op};

use crate::args::Mode;

/// xorshift64*: fast, good enough for offsets and payload bytes.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn seeded() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng((t ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias worth caring about.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A reusable write payload with its CRC.
pub(crate) struct Payload {
    pub(crate) data: Bytes,
    pub(crate) crc32: u32,
}

impl Payload {
    pub(crate) fn random(rng: &mut Rng, len: usize) -> Self {
        let mut v = vec![0u8; len];
        rng.fill(&mut v);
        let crc32 = crc32fast::hash(&v);
        Payload {
            data: Bytes::from(v),
            crc32,
        }
    }
}

/// Request identity shared by every stream of the session: ids are unique
/// and revisions increase across runs.
pub(crate) struct Session {
    pub(crate) epoch: u64,
    /// The data-stream session the replica's `Open` returned.
    pub(crate) stream_session: u64,
    pub(crate) next_id: u64,
    pub(crate) next_revision: u64,
}

impl Session {
    pub(crate) fn request(
        &mut self,
        op: Op,
        offset: u64,
        length: u32,
        payload: Option<&Payload>,
    ) -> IoRequest {
        let id = self.next_id;
        self.next_id += 1;
        let revision = self.next_revision;
        self.next_revision += 1;
        let (payload, crc32) = match payload {
            Some(p) => (p.data.clone(), p.crc32),
            None => (Bytes::new(), 0),
        };
        IoRequest {
            id,
            op: op as i32,
            offset,
            length,
            payload,
            crc32,
            revision,
            epoch: self.epoch,
            // The load keeps requests in flight side by side, as a busy
            // engine does.
            alone: false,
        }
    }
}

/// Produces the random requests of the measured runs.
pub(crate) struct Generator {
    pub(crate) mode: Mode,
    pub(crate) bs: u64,
    /// Number of `bs`-sized slots in the span.
    pub(crate) slots: u64,
    pub(crate) rng: Rng,
    pub(crate) payloads: Vec<Payload>,
}

impl Generator {
    pub(crate) fn next(&mut self, session: &mut Session) -> IoRequest {
        let offset = self.rng.below(self.slots) * self.bs;
        let r = self.rng.next();
        let write = match self.mode {
            Mode::Write => true,
            Mode::Read => false,
            Mode::Mixed => r & 1 == 1,
        };
        if write {
            let p = &self.payloads[((r >> 1) % self.payloads.len() as u64) as usize];
            session.request(Op::Write, offset, self.bs as u32, Some(p))
        } else {
            session.request(Op::Read, offset, self.bs as u32, None)
        }
    }
}
