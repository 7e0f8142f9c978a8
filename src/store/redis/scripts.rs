//! The Lua scripts: each reads and writes keys under one hash tag atomically (one
//! credential's, one declared limit's, one client's, or usage's `{use}`), every key passed
//! in `KEYS` (one Redis Cluster slot).

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

/// A cool-down: field = model (or `*`), value = until (Unix ms), raised only if later;
/// field `~model` = why (a small number: reason and scope), beside it. Replicas that
/// predate `~` fields read them as cool-downs long over.
pub(super) const COOL: &str = r#"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) <= cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], '~' .. ARGV[1], ARGV[5])
redis.call('PEXPIREAT', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(redis.call('PEXPIRETIME', KEYS[1]))))
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' cool')
return 1
"#;

/// Takes one request (and ARGV[4] tokens) from a declared limit's windows, or nothing:
/// KEYS[1] the minute (hash: `r`, `t`), KEYS[2] the day; ARGV rpm, tpm, rpd (0: none),
/// tokens, the minute's and the day's time to live (ms). Returns 0 taken, 1 rpm full,
/// 2 tpm full, 3 rpd full. A request is never refused by tpm alone in an empty minute.
pub(super) const TAKE: &str = r#"
local rpm, tpm, rpd, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local m = redis.call('HMGET', KEYS[1], 'r', 't')
local r, t = tonumber(m[1] or '0'), tonumber(m[2] or '0')
local d = tonumber(redis.call('GET', KEYS[2]) or '0')
if rpm > 0 and r + 1 > rpm then return 1 end
if tpm > 0 and t > 0 and t + tokens > tpm then return 2 end
if rpd > 0 and d + 1 > rpd then return 3 end
redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('HINCRBY', KEYS[1], 't', tokens)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 0
"#;

/// A client's request: KEYS = minute hash (`r`, `t`), UTC day, month (tokens); ARGV = rpm,
/// tpm, tokens per day, tokens per month (0: none), the minute's TTL in ms. Returns 0
/// taken (one request counted), else the window that is full: 1 rpm, 2 tpm, 3 day,
/// 4 month. Tokens are added when answers end (`SharedCounts::spend_client`).
pub(super) const CLIENT_TAKE: &str = r#"
local rpm, tpm, tpd, tpmo = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local m = redis.call('HMGET', KEYS[1], 'r', 't')
local r, t = tonumber(m[1] or '0'), tonumber(m[2] or '0')
if tpmo > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= tpmo then return 4 end
if tpd > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpd then return 3 end
if tpm > 0 and t >= tpm then return 2 end
if rpm > 0 and r + 1 > rpm then return 1 end
redis.call('HINCRBY', KEYS[1], 'r', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 0
"#;

/// A batch of usage rows, applied once: KEYS = the batch's marker, then bucket hashes;
/// ARGV = the marker's TTL, then per bucket its TTL, its number of fields and the
/// field/increment pairs. A batch whose marker exists was applied (a retry after a lost
/// answer): nothing is added again. Returns 1 applied, 0 already applied.
pub(super) const USAGE_ADD: &str = r#"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local i = 2
for b = 2, #KEYS do
  local ttl, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  i = i + 2
  for _ = 1, n do
    redis.call('HINCRBY', KEYS[b], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('EXPIRE', KEYS[b], ttl)
end
return 1
"#;

/// Seals a record again in place: KEYS[1] the record; ARGV = the version and the stored
/// document that were read, and the document sealed with the current key. Replaced only if
/// both are still what was read; the version is not raised and nothing is published (it
/// is the same document: no lease, attempt or verdict depends on its form). 1 replaced.
pub(super) const RESEAL: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'v', 'doc')
if tonumber(r[1] or '0') ~= tonumber(ARGV[1]) or r[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[3])
return 1
"#;
