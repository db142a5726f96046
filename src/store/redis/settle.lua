-- Settlements one after another, each applied at most once per reservation.
-- KEYS: per settlement, the hash its reservation's settlement marker goes
-- in, then its counters.
-- ARGV[1]: seconds a marker hash is kept after its last write (relative,
-- so that no clock but Redis' own decides when markers go). Then per
-- settlement: its reservation id; the unix time its period counters expire
-- at; its number of counters n; and n times the counter's correction, '1'
-- if a gauge.
-- Reply, one string with a character per settlement: 1 if applied, 0 if
-- that reservation was settled before, E if not applied because its marker
-- hash or one of its counters holds what tollgate did not write there.
local function each(visit)
  local key, arg = 1, 2
  while arg <= #ARGV do
    local counters = tonumber(ARGV[arg + 2])
    visit(key, arg, counters)
    key = key + 1 + counters
    arg = arg + 3 + 2 * counters
  end
end
-- Which of the ids are marked already: one HMGET per marker hash.
local asked = {}
each(function(key, arg)
  local ids = asked[KEYS[key]] or {}
  ids[#ids + 1] = ARGV[arg]
  asked[KEYS[key]] = ids
end)
local settled, damaged = {}, {}
for hash, ids in pairs(asked) do
  local found = redis.pcall('HMGET', hash, unpack(ids))
  if wrong_type(found) then
    damaged[hash] = true
  else
    for i, id in ipairs(ids) do
      if found[i] then
        settled[hash .. ' ' .. id] = true
      end
    end
  end
end
-- Then each settlement, in order.
local marks, replies = {}, {}
each(function(key, arg, counters)
  local hash, id = KEYS[key], ARGV[arg]
  local marker = hash .. ' ' .. id
  if settled[marker] then
    replies[#replies + 1] = '0'
    return
  end
  if damaged[hash] or not intact(key, counters) then
    replies[#replies + 1] = 'E'
    return
  end
  settled[marker] = true
  local fields = marks[hash] or {}
  fields[#fields + 1] = id
  fields[#fields + 1] = '1'
  marks[hash] = fields
  for i = 1, counters do
    add(KEYS[key + i], tonumber(ARGV[arg + 1 + 2 * i]), ARGV[arg + 2 + 2 * i], ARGV[arg + 1])
  end
  replies[#replies + 1] = '1'
end)
for hash, fields in pairs(marks) do
  write_later('HSET', hash, unpack(fields))
  write_later('EXPIRE', hash, ARGV[1])
end
flush()
return table.concat(replies)
