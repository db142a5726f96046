-- What the reserve and settle scripts share; each script is this file
-- followed by its own. See `RESERVE` and `SETTLE` in src/store/redis.rs.
local values, written, later = {}, {}, {}
-- The most a counter holds (`quota::MAX_AMOUNT`, 2^53 - 1): past it a
-- double no longer counts by ones. Compared as text too, since a double
-- cannot tell 2^53 from it.
local MOST_TEXT = '9007199254740991'
local MOST = tonumber(MOST_TEXT)
-- The number `text` is if it is the decimal integer text tollgate writes,
-- within MOST either way; else nil. (`tonumber` alone would take 'nan',
-- 'inf', '1.5', '1e3', '0x10' and ' 7', and the first two would then be
-- written back as numbers no limit stops.)
local function integer(text)
  local digits = type(text) == 'string' and string.match(text, '^%-?(%d+)$')
  if not digits or #digits > #MOST_TEXT or (#digits == #MOST_TEXT and digits > MOST_TEXT) then
    return nil
  end
  return tonumber(text)
end
-- Whether a `redis.pcall` reply is Redis refusing a key of another type.
-- Any other error (an ACL's, say) is raised: it is no damaged key, and the
-- whole call fails, to be retried.
local function wrong_type(reply)
  if type(reply) == 'table' and reply.err then
    if string.find(reply.err, '^WRONGTYPE') then
      return true
    end
    error(reply)
  end
  return false
end
-- A counter's value so far in this call; false if it holds what tollgate
-- does not write there.
local function value(counter)
  if values[counter] == nil then
    local stored = redis.pcall('GET', counter)
    if wrong_type(stored) then
      values[counter] = false
    elseif not stored then
      values[counter] = 0
    else
      values[counter] = integer(stored) or false
    end
  end
  return values[counter]
end
-- Whether every counter of an item (KEYS[first + 1 .. first + n]) holds
-- what tollgate writes there.
local function intact(first, n)
  for i = 1, n do
    if value(KEYS[first + i]) == false then
      return false
    end
  end
  return true
end
-- Adds `amount` to a counter; a release never takes it below zero, nor an
-- increment past MOST. A gauge ('1') keeps no expiry; a period counter
-- expires at `expire_at`. Returns the amount added.
local function add(counter, amount, gauge, expire_at)
  local current = value(counter)
  if amount < 0 then
    amount = math.max(amount, -math.max(current, 0))
  else
    amount = math.min(amount, MOST - current)
  end
  if amount ~= 0 then
    values[counter] = current + amount
    written[counter] = gauge == '1' and 'gauge' or expire_at
  end
  return amount
end
-- A connection's record of its last reserve call (see `CallRecord` in
-- src/store/redis.rs): the call's number and reply ('V': asked about and
-- not run); 0 and nil if there is none, or it is not one tollgate wrote.
local function record_of(key)
  local text = redis.pcall('GET', key)
  if type(text) ~= 'string' then
    return 0, nil
  end
  local sequence, reply = string.match(text, '^(%d+) (.*)$')
  if not sequence then
    return 0, nil
  end
  return tonumber(sequence), reply
end
-- A write other than a counter's (a whole command), made at the end.
local function write_later(...)
  later[#later + 1] = {...}
end
local function flush()
  for counter, expiry in pairs(written) do
    local text = string.format('%d', values[counter])
    if expiry == 'gauge' then
      redis.call('SET', counter, text, 'KEEPTTL')
    else
      redis.call('SET', counter, text, 'EXAT', expiry)
    end
  end
  for _, command in ipairs(later) do
    redis.call(unpack(command))
  end
end
