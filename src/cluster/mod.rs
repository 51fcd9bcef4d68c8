//! Cluster mode: N replicas that share their fencing state in PostgreSQL.
//!
//! Every resource belongs to one of a fixed number of shards ([`ShardMap`]), and every shard to at
//! most one replica at a time, through a lease in PostgreSQL. The replica that holds a shard's
//! lease gates that shard's requests with the ordinary in-memory gate, and every durable write it
//! makes is conditional on still holding the lease, in the same transaction
//! (`store::postgres`). [`Ownership`] is this replica's view of what it holds and until when, on a
//! clock that keeps counting through SIGSTOP and suspend ([`clock`]).

pub mod clock;
pub mod lease;
pub mod ownership;

pub use ownership::{Ownership, Term};

/// The fixed hash that puts a resource in a shard: 64-bit FNV-1a of the resource name's UTF-8
/// bytes, modulo the shard count. Documented and never changed: every replica of every version
/// must put a resource in the same shard, so `DefaultHasher` (whose algorithm may change between
/// Rust releases) is not an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMap {
    shards: u32,
}

/// A shard's number, `0..shards`.
pub type Shard = u32;

impl ShardMap {
    /// # Panics
    /// If `shards` is zero (the config refuses it).
    pub fn new(shards: u32) -> Self {
        assert!(shards > 0, "a cluster has at least one shard");
        Self { shards }
    }

    pub fn shards(self) -> u32 {
        self.shards
    }

    /// The shard of `resource`.
    pub fn shard_of(self, resource: &str) -> Shard {
        (fnv1a_64(resource.as_bytes()) % u64::from(self.shards)) as Shard
    }
}

/// Whether `sent` (a `Fencegate-Cluster-Secret` header value) is the cluster `secret`, compared in
/// constant time. Without a secret (a loopback-only peer plane) anything passes.
pub fn secret_matches(secret: Option<&str>, sent: Option<&[u8]>) -> bool {
    match (secret, sent) {
        (None, _) => true,
        (Some(secret), Some(sent)) => {
            let secret = secret.as_bytes();
            secret.len() == sent.len()
                && secret
                    .iter()
                    .zip(sent)
                    .fold(0_u8, |acc, (x, y)| acc | (x ^ y))
                    == 0
        }
        (Some(_), None) => false,
    }
}

/// 64-bit FNV-1a (http://www.isthe.com/chongo/tech/comp/fnv/): small, fast on short keys, and
/// fully specified, so anyone can compute a resource's shard by hand.
pub(crate) fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_resource_always_lands_in_the_same_shard() {
        let map = ShardMap::new(64);
        assert_eq!(map.shard_of("wallet:42"), map.shard_of("wallet:42"));
        assert_eq!(
            map.shard_of("foobar"),
            (0x8594_4171_f739_67e8_u64 % 64) as u32
        );
        assert!((0..1000).all(|i| map.shard_of(&format!("r{i}")) < 64));
    }

    #[test]
    fn resources_spread_over_the_shards() {
        let map = ShardMap::new(16);
        let mut counts = [0_u32; 16];
        for i in 0..16_000 {
            counts[map.shard_of(&format!("wallet:{i}")) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&count| (700..1300).contains(&count)),
            "{counts:?}"
        );
    }
}
