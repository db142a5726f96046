-- The whole catalog at one moment, with its version.
-- KEYS[1]: the org records; KEYS[2]: the key records; KEYS[3]: the version.
-- Reply: {version, {org, json, ...}, {key id, json, ...}}.
return {
  redis.call('GET', KEYS[3]) or '0',
  redis.call('HGETALL', KEYS[1]),
  redis.call('HGETALL', KEYS[2]),
}
