//! What a byte-bounded store can hold: the arithmetic both the `[cache]` validation and
//! the store itself use, so that what `stoa check` promises is what the store admits.

/// Per-entry memory beyond key, header bytes and body: the entry, its header map, the
/// cache index and allocator rounding. Measured at about 1.7 KiB per entry of JSON
/// answers (20,000 entries: 51 MB of RSS for 17 MB of key, header and body bytes).
pub const ENTRY_OVERHEAD: u64 = 1536;

/// Room kept in every entry for its response head, key and request beside the body, when
/// telling how large a body the store can hold.
pub const HEAD_ALLOWANCE: u64 = 4096;

/// Shards of the store, fixed so that what it can hold does not depend on the machine.
/// quick_cache uses fewer for small stores (at least 32 estimated entries per shard).
pub const SHARDS: usize = 8;

/// quick_cache's share of a shard for entries on probation and in use (its default).
pub const HOT_ALLOCATION: f64 = 0.97;

/// Smallest `cache.disk.max_bytes`: room for [`DISK_MIN_BLOCKS`] blocks of the smallest size.
pub const DISK_MIN_BYTES: u64 = 16 * 1024 * 1024;

/// The disk tier writes its entries into blocks of one size, evicting a whole block at a
/// time (oldest first); an entry never spans two blocks.
pub const DISK_MIN_BLOCKS: u64 = 16;

/// Bytes of a block of a disk tier of `max_bytes`: a 16th of it, 1 to 64 MiB, whole pages.
pub fn disk_block_bytes(max_bytes: u64) -> u64 {
    let block = (max_bytes / DISK_MIN_BLOCKS).clamp(1 << 20, 64 << 20);
    block / 4096 * 4096
}

/// The largest response body the disk tier of `max_bytes` holds in one entry: the body
/// and its compressed copies share one block, beside the head (16 times
/// [`HEAD_ALLOWANCE`] kept for it and the block's own bookkeeping).
pub fn largest_disk_body(max_bytes: u64) -> u64 {
    disk_block_bytes(max_bytes).saturating_sub(16 * HEAD_ALLOWANCE) / 2
}

/// Entries are estimated at about 1 KiB (JSON answers); this only sizes the index.
pub fn estimated_items(max_bytes: u64) -> usize {
    (max_bytes / 1024).clamp(64, 1 << 20) as usize
}

/// The heaviest entry a store of `max_bytes` admits: quick_cache splits the bound among
/// its shards and refuses an entry heavier than the hot share of one shard.
pub fn largest_entry_weight(max_bytes: u64) -> u64 {
    let items = estimated_items(max_bytes) as u64;
    let mut shards = SHARDS.next_power_of_two() as u64;
    while items.div_ceil(shards) < 32 && shards > 1 {
        shards /= 2;
    }
    let shard = max_bytes.div_ceil(shards);
    ((shard as f64 * HOT_ALLOCATION) as u64).clamp(shard.min(1), shard)
}

/// The largest response body a store of `max_bytes` can hold in one entry, keeping
/// [`HEAD_ALLOWANCE`] for the rest of the entry.
pub fn largest_body(max_bytes: u64) -> u64 {
    largest_entry_weight(max_bytes).saturating_sub(ENTRY_OVERHEAD + HEAD_ALLOWANCE)
}
