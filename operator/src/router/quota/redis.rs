//! Limits shared by every router replica, in Redis or Valkey: each admission,
//! charge and release is one script run atomically on the server, on the
//! server's clock, so replicas neither race nor need synchronised clocks.
//!
//! Per tenant (the `{tenant}` hash tag keeps a tenant's keys on one cluster
//! slot): `kandle:quota:{t}:requests` and `:tokens`, hashes holding a token
//! bucket's level and reading time; `:running`, a sorted set of the requests in
//! flight scored by when their lease ends, so a router that dies leaves no
//! request counted for longer than the lease.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::bucket::{Bucket, Standing};
use super::{Admission, Refusal, Which};
use crate::tenants::Limits;

/// The longest a request counts toward `concurrentRequests` without being released.
pub const RUNNING_LEASE: Duration = Duration::from_secs(15 * 60);

/// The bucket arithmetic of [`super::bucket`], in Lua. Levels go back as
/// strings: Redis truncates Lua numbers to integers.
const READ_BUCKET: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function read(key, limit)
  local v = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(v[1]), tonumber(v[2])
  if level == nil or at == nil then return limit end
  local refilled = level + math.max(0, now - at) * limit / 60
  if refilled > limit then return limit end
  return refilled
end
local function write(key, level, limit)
  redis.call('HSET', key, 'level', tostring(level), 'at', tostring(now))
  -- Gone once it would be full again: an absent bucket reads as full.
  redis.call('EXPIRE', key, math.ceil((limit - level) * 60 / limit) + 1)
end
";

const ADMIT: &str = r"
-- KEYS: requests bucket, tokens bucket, running set
-- ARGV: requests per minute, tokens per minute, concurrent requests (0: no limit), request id, lease ms
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local refused, rlevel, tlevel = 0, 0, 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now * 1000)
  if redis.call('ZCARD', KEYS[3]) >= conc then refused = 3 end
end
if tpm > 0 then
  tlevel = read(KEYS[2], tpm)
  if refused == 0 and tlevel < 1 then refused = 2 end
end
if rpm > 0 then
  rlevel = read(KEYS[1], rpm)
  if refused == 0 and rlevel < 1 then refused = 1 end
end
if refused == 0 then
  if rpm > 0 then rlevel = rlevel - 1 end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], now * 1000 + tonumber(ARGV[5]), ARGV[4])
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
  end
end
if rpm > 0 then write(KEYS[1], rlevel, rpm) end
if tpm > 0 then write(KEYS[2], tlevel, tpm) end
return {refused, tostring(rlevel), tostring(tlevel)}
";

const CHARGE: &str = r"
-- KEYS: tokens bucket; ARGV: tokens per minute, tokens used
local tpm = tonumber(ARGV[1])
write(KEYS[1], read(KEYS[1], tpm) - tonumber(ARGV[2]), tpm)
return 1
";

const RELEASE: &str = r"
-- KEYS: running set; ARGV: request id
return redis.call('ZREM', KEYS[1], ARGV[1])
";

pub struct RedisStore {
    connection: ConnectionManager,
    admit: Script,
    charge: Script,
    release: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

fn key(tenant: &str, what: &str) -> String {
    format!("kandle:quota:{{{tenant}}}:{what}")
}

impl RedisStore {
    /// Connects lazily: a store that is down at start is tried again on use.
    /// Each command gives up after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        Ok(Self {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            admit: Script::new(&format!("{READ_BUCKET}{ADMIT}")),
            charge: Script::new(&format!("{READ_BUCKET}{CHARGE}")),
            release: Script::new(RELEASE),
        })
    }

    pub async fn admit(&self, tenant: &str, limits: &Limits, request_id: &str) -> redis::RedisResult<Admission> {
        let (refused, rlevel, tlevel): (u8, String, String) = self
            .admit
            .key(key(tenant, "requests"))
            .key(key(tenant, "tokens"))
            .key(key(tenant, "running"))
            .arg(limits.requests_per_minute.unwrap_or(0))
            .arg(limits.tokens_per_minute.unwrap_or(0))
            .arg(limits.concurrent_requests.unwrap_or(0))
            .arg(request_id)
            .arg(RUNNING_LEASE.as_millis() as u64)
            .invoke_async(&mut self.connection.clone())
            .await?;
        let level = |text: &str| text.parse::<f64>().unwrap_or(0.0);
        let requests = limits.requests_per_minute.map(|l| (Bucket { level: level(&rlevel), at: 0.0 }, u64::from(l)));
        let tokens = limits.tokens_per_minute.map(|l| (Bucket { level: level(&tlevel), at: 0.0 }, l));
        let retry = |bucket: Option<(Bucket, u64)>| bucket.map_or(Duration::ZERO, |(b, l)| b.time_to(1.0, l));
        let refusal = match refused {
            1 => Some(Refusal { which: Which::Requests, retry_after: retry(requests) }),
            2 => Some(Refusal { which: Which::Tokens, retry_after: retry(tokens) }),
            3 => Some(Refusal { which: Which::Concurrency, retry_after: Duration::from_secs(1) }),
            _ => None,
        };
        Ok(Admission {
            requests: requests.map(|(b, l)| Standing::of(b, l)),
            tokens: tokens.map(|(b, l)| Standing::of(b, l)),
            refusal,
        })
    }

    pub async fn charge(&self, tenant: &str, limits: &Limits, used: u64) -> redis::RedisResult<()> {
        let Some(limit) = limits.tokens_per_minute else { return Ok(()) };
        let _: i64 = self
            .charge
            .key(key(tenant, "tokens"))
            .arg(limit)
            .arg(used)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    pub async fn release(&self, tenant: &str, request_id: &str) -> redis::RedisResult<()> {
        let _: i64 =
            self.release.key(key(tenant, "running")).arg(request_id).invoke_async(&mut self.connection.clone()).await?;
        Ok(())
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING").query_async::<String>(&mut self.connection.clone()).await.map(drop)
    }
}
