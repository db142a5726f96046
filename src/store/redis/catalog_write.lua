-- One change to the catalog of runtime orgs and keys, with its version and
-- its notice, atomically: a watcher that reads version N has every change
-- up to N, and a notice numbered N carries change N.
-- KEYS[1]: the hash of records of this kind; KEYS[2]: the version counter.
-- ARGV[1]: the notice channel; ARGV[2]: 'org' or 'key'; ARGV[3]: the
-- record's id; ARGV[4]: its JSON, or '' to remove it.
-- Reply: {version, 1 if anything changed else 0}. Removing a record that is
-- not there changes nothing, and neither the version nor a notice follows.
if ARGV[4] == '' then
  if redis.call('HDEL', KEYS[1], ARGV[3]) == 0 then
    return {tonumber(redis.call('GET', KEYS[2]) or '0'), 0}
  end
else
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
end
local version = redis.call('INCR', KEYS[2])
local notice = version .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
if ARGV[4] ~= '' then
  notice = notice .. '\n' .. ARGV[4]
end
redis.call('PUBLISH', ARGV[1], notice)
return {version, 1}
