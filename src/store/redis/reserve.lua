-- Reservations one after another, each checked and applied all or none.
-- KEYS: the connection's call record (only if ARGV[2] is not '0'); then per
-- reservation, its marker (only if remembered), then its counters.
-- ARGV[1]: seconds to remember each reservation's reply, '0' for not at all.
-- ARGV[2]: this call's number, '0' for a call not recorded; ARGV[3]: seconds
-- to keep the record. Then per reservation: '1' to enforce or '0' for shadow
-- mode; the unix time its period counters expire at; its number of counters
-- n; and n times the counter's cost, limit (-1: none), '1' if a gauge.
-- Reply: 'S' for a call numbered no higher than the record's, which was
-- asked about (ask.lua) and answered as not run: it runs nothing. Else one
-- string, a part per reservation, separated by ';'. 'E' is a reservation
-- not made, as its marker or a counter holds what tollgate did not write
-- there. The usual outcome, admitted with nothing exceeded and every cost
-- applied as asked, is n integers separated by spaces: each counter's value
-- after it (what the gateway's RateLimit headers report). Any other is 3 +
-- 2n integers separated by spaces: admitted (1 or 0), the index of its
-- first exceeded counter or 0, that counter's value, the amount applied to
-- each counter, then each counter's value after it (as found, if denied).
-- The two never have the same count, so the count tells them apart.
-- (Converting numbers to and from text is most of what a reservation costs
-- Redis, hence also each cost parsed once into `costs`, and no more than
-- the counters' values added to the usual reply; reading an array of
-- integers is most of what the reply costs the gateway.)
-- The reply a marker remembers, or false if it holds no reply of a
-- reservation of `counters` counters. (Only the process that wrote a marker
-- reads it, under its reservation's id, so a marker never holds another
-- version's reply.)
local function remembered(text, counters)
  local decoded, reply = pcall(cjson.decode, text)
  if not decoded or type(reply) ~= 'table' or #reply ~= 3 + 2 * counters then
    return false
  end
  for i = 1, #reply do
    local part = reply[i]
    if type(part) ~= 'number' or part ~= math.floor(part) or math.abs(part) > MOST then
      return false
    end
  end
  if (reply[1] ~= 0 and reply[1] ~= 1) or reply[2] < 0 or reply[2] > counters then
    return false
  end
  return reply
end
local remember, sequence = ARGV[1], ARGV[2]
local markers = remember ~= '0' and 1 or 0
local replies, costs, key, arg = {}, {}, 1, 4
if sequence ~= '0' then
  if record_of(KEYS[1]) >= tonumber(sequence) then
    return 'S'
  end
  key = 2
end
while arg <= #ARGV do
  local enforce, expire_at, counters = ARGV[arg] == '1', ARGV[arg + 1], tonumber(ARGV[arg + 2])
  -- Counter i is KEYS[first + i].
  local first = key + markers - 1
  for i = 1, counters do
    costs[i] = tonumber(ARGV[arg + 3 * i])
  end
  local reply = nil
  if markers == 1 then
    -- A client that resends a call it got no reply to gets the first reply.
    local earlier = redis.pcall('GET', KEYS[key])
    if wrong_type(earlier) then
      reply = 'E'
    elseif earlier then
      reply = remembered(earlier, counters) or 'E'
    end
  end
  if not reply and not intact(first, counters) then
    reply = 'E'
  elseif not reply then
    local exceeded, exceeded_value = 0, 0
    for i = 1, counters do
      if exceeded == 0 and costs[i] > 0 then
        local limit, current = tonumber(ARGV[arg + 3 * i + 1]), value(KEYS[first + i])
        if limit >= 0 and current + costs[i] > limit then
          exceeded, exceeded_value = i, current
        end
      end
    end
    reply = {0, exceeded, exceeded_value}
    local admitted = exceeded == 0 or not enforce
    if admitted then
      reply[1] = 1
    end
    for i = 1, counters do
      reply[3 + i] = admitted
        and add(KEYS[first + i], costs[i], ARGV[arg + 3 * i + 2], expire_at)
        or 0
      reply[3 + counters + i] = value(KEYS[first + i])
    end
    if markers == 1 then
      write_later('SET', KEYS[key], cjson.encode(reply), 'EX', remember)
    end
  end
  local usual = reply ~= 'E' and reply[1] == 1 and reply[2] == 0
  for i = 1, counters do
    usual = usual and reply[3 + i] == costs[i]
  end
  if reply == 'E' then
    replies[#replies + 1] = 'E'
  elseif usual then
    -- Numbers below 10^14 are left to table.concat, whose conversion
    -- ('%.14g') writes them as the same digits as '%d' at less cost than
    -- string.format; larger ones would come out in exponent form.
    local parts = {}
    for i = 1, counters do
      local after = reply[3 + counters + i]
      parts[i] = after < 1e14 and after or string.format('%d', after)
    end
    replies[#replies + 1] = counters == 1 and parts[1] or table.concat(parts, ' ')
  else
    local parts = {}
    for i, part in ipairs(reply) do
      parts[i] = string.format('%d', part)
    end
    replies[#replies + 1] = table.concat(parts, ' ')
  end
  key = key + markers + counters
  arg = arg + 3 + 3 * counters
end
local reply = table.concat(replies, ';')
if sequence ~= '0' then
  write_later('SET', KEYS[1], sequence .. ' ' .. reply, 'EX', ARGV[3])
end
flush()
return reply
