-- The outcome of a reserve call whose reply was lost, from the connection's
-- call record (see `CallRecord` in src/store/redis.rs).
-- KEYS[1]: the record. ARGV[1]: the call's number; ARGV[2]: seconds to keep
-- the record.
-- Reply: the call's own reply if it ran. If it did not, 'V', and the record
-- takes its number, so that the call runs nothing should it still arrive.
local sequence, reply = record_of(KEYS[1])
local asked = tonumber(ARGV[1])
if sequence == asked then
  return reply
end
if sequence > asked then
  -- Calls go one at a time, each asked about before the next is sent.
  return redis.error_reply('ERR a later reserve call is recorded')
end
redis.call('SET', KEYS[1], ARGV[1] .. ' V', 'EX', ARGV[2])
return 'V'
