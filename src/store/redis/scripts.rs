//! The Lua scripts: each reads and writes one credential's keys atomically, every key
//! passed in `KEYS` (one hash tag, one Redis Cluster slot).

pub(super) const CAS: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return {0, v} end
redis.call('HSET', KEYS[1], 'v', v + 1, 'doc', ARGV[2], 'writer', ARGV[3], 'updated_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'src', ARGV[5]) end
redis.call('PUBLISH', ARGV[6], ARGV[7] .. ' ' .. (v + 1))
return {1, v + 1}
"#;

/// Puts back a record Redis lost (or holds an older version of): only if absent or lower.
pub(super) const REASSERT: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'doc', ARGV[2], 'writer', ARGV[3], 'updated_at', ARGV[4], 'src', ARGV[5])
return 1
"#;

pub(super) const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#;

pub(super) const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

pub(super) const COOL: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(redis.call('PEXPIRETIME', KEYS[1]))))
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' cool')
return 1
"#;
