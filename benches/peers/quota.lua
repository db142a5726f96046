-- The Redis quota check of the nginx + Lua peer (nginx-lua.conf). Kong's
-- rate-limiting plugin talks to Redis the same way, over a keep-alive pool of
-- cosockets, but reads the counter and increments it in two round trips, so
-- that concurrent requests all see room left; here the check and the
-- increment are one script, which Redis runs alone. The few lines of RESP
-- are written out below: the Redis client of this ecosystem is not packaged.
local M = {}

-- KEYS[1]: the org's counter this period. ARGV: the cost, the org's limit.
-- Answers the new count, or -1 (and leaves the counter) past the limit.
local SCRIPT = [[
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost = tonumber(ARGV[1])
if used + cost > tonumber(ARGV[2]) then return -1 end
return redis.call('INCRBY', KEYS[1], cost)
]]
local SHA = ngx.sha1_bin(SCRIPT):gsub(".", function(c) return string.format("%02x", c:byte()) end)

-- The same limits as the gateway's config in benches/harness.py.
local LIMITS = { org_broke = 0, org_exact = 100 }
local DEFAULT_LIMIT = "1000000000000"
local POOL_SIZE = 128
local IDLE_MS = 60000

local function command(...)
  local args = { ... }
  local out = { "*", tostring(#args), "\r\n" }
  for _, arg in ipairs(args) do
    arg = tostring(arg)
    out[#out + 1] = "$" .. #arg .. "\r\n"
    out[#out + 1] = arg
    out[#out + 1] = "\r\n"
  end
  return out
end

-- One reply: an integer, a status or bulk string, or nil and the error.
local function reply(sock)
  local line, err = sock:receive("*l")
  if not line then return nil, err end
  local kind, rest = line:sub(1, 1), line:sub(2)
  if kind == ":" then return tonumber(rest) end
  if kind == "+" then return rest end
  if kind == "-" then return nil, rest end
  if kind == "$" then
    local size = tonumber(rest)
    if size < 0 then return ngx.null end
    local data, derr = sock:receive(size + 2)
    if not data then return nil, derr end
    return data:sub(1, size)
  end
  return nil, "unexpected reply " .. line
end

local function call(sock, ...)
  local sent, err = sock:send(command(...))
  if not sent then return nil, err end
  return reply(sock)
end

local function check_and_increment(sock, key, limit)
  local count, err = call(sock, "EVALSHA", SHA, 1, key, 1, limit)
  if err and err:find("^NOSCRIPT") then
    local _, lerr = call(sock, "SCRIPT", "LOAD", SCRIPT)
    if lerr then return nil, lerr end
    count, err = call(sock, "EVALSHA", SHA, 1, key, 1, limit)
  end
  return count, err
end

function M.check(host, port)
  local org = ngx.var.http_x_org_id
  if not org then return ngx.exit(401) end
  local sock = ngx.socket.tcp()
  sock:settimeout(1000)
  local ok, err = sock:connect(host, port)
  if not ok then
    ngx.log(ngx.ERR, "redis: ", err)
    return ngx.exit(503)
  end
  -- The counter of this calendar month, as the gateway's monthly period.
  local key = "quota:" .. org .. ":" .. ngx.utctime():sub(1, 7) .. ":playbook_runs"
  local count, cerr = check_and_increment(sock, key, LIMITS[org] or DEFAULT_LIMIT)
  if cerr then
    sock:close()
    ngx.log(ngx.ERR, "redis: ", cerr)
    return ngx.exit(503)
  end
  sock:setkeepalive(IDLE_MS, POOL_SIZE)
  if count < 0 then return ngx.exit(429) end
end

return M
