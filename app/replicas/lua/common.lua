-- The replicas' shared queue, the prelude of every script (app/replicas/store.py explains the keys).
-- ARGV[1] is the key prefix, ARGV[2] the fleet as the calling replica sees it (JSON), ARGV[3] its replica id.
local P = ARGV[1]
local TOPO = cjson.decode(ARGV[2])
local CALLER = ARGV[3]
-- A ticket's score: its level, then its turn within the level (per-key round robin), ties by arrival.
local LEVEL = 1e13
local OFFSET = 1e12

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW = now_ms()

local function alive(replica)
  return replica == CALLER or redis.call('EXISTS', P .. ':rep:' .. replica) == 1
end

local function ticket_info(ticket)
  local v = redis.call('HMGET', P .. ':t:' .. ticket, 'rep', 'pool', 'rank', 'prio', 'key', 'cost', 'rid', 'avoid', 'aff', 'arr')
  if not v[1] then return nil end
  return {rep = v[1], pool = v[2], rank = tonumber(v[3]), prio = tonumber(v[4]), key = v[5], cost = tonumber(v[6]),
          rid = v[7], avoid = v[8], aff = v[9], arr = tonumber(v[10])}
end

-- The score of a ticket joining `rank`: behind every ticket its key has waiting there; with none waiting, in
-- the round being served now. `first`: ahead of everything at the level (it was dispatched once already).
local function join_level(pool, rank, key, first)
  local turns = P .. ':turns:' .. pool
  local round = tonumber(redis.call('HGET', turns, 'r' .. rank) or '0')
  local count_f, last_f = 'c' .. rank .. '|' .. key, 'k' .. rank .. '|' .. key
  local turn
  if first then
    turn = round - 1
  else
    local waiting = tonumber(redis.call('HGET', turns, count_f) or '0')
    turn = round
    if waiting > 0 then
      turn = math.max(round, tonumber(redis.call('HGET', turns, last_f) or round - 1) + 1)
    end
    redis.call('HSET', turns, last_f, tostring(turn))
  end
  redis.call('HINCRBY', turns, count_f, 1)
  return rank * LEVEL + OFFSET + turn
end

local function leave_level(pool, rank, key)
  local turns = P .. ':turns:' .. pool
  local count_f = 'c' .. rank .. '|' .. key
  if redis.call('HINCRBY', turns, count_f, -1) <= 0 then
    redis.call('HDEL', turns, count_f, 'k' .. rank .. '|' .. key)
  end
end

-- Take a waiting ticket out of its pool's queue (dispatched, withdrawn, or its replica is gone).
local function unqueue(pool, ticket, info)
  redis.call('ZREM', P .. ':q:' .. pool, ticket)
  if TOPO.aging > 0 then redis.call('ZREM', P .. ':age:' .. pool, ticket) end
  leave_level(pool, info.rank, info.key)
  if info.key ~= '' then
    if redis.call('HINCRBY', P .. ':kw', info.key, -1) <= 0 then redis.call('HDEL', P .. ':kw', info.key) end
  end
end

local function forget_ticket(ticket, replica)
  redis.call('DEL', P .. ':t:' .. ticket)
  if replica then redis.call('SREM', P .. ':mine:' .. replica, ticket) end
end

local function forget_id(rid, key, replica)
  local ids = P .. ':id:' .. rid
  if redis.call('HGET', ids, key) == replica then redis.call('HDEL', ids, key) end
end

-- Token buckets (RPM/TPM) as hashes of level and time, full when absent; refilled `limit` per minute.
local function bucket_level(hash, f, limit)
  local v = redis.call('HMGET', hash, f .. 'l', f .. 't')
  local level, at = tonumber(v[1]), tonumber(v[2])
  if not level then return limit end
  return math.min(limit, level + (NOW - at) * limit / 60000.0)
end

local function bucket_wait(level, amount, limit)
  local missing = math.min(amount, limit) - level
  if missing <= 0 then return 0 end
  return math.ceil(missing * 60000.0 / limit)
end

local function bucket_add(hash, f, limit, amount)
  local level = math.min(limit, bucket_level(hash, f, limit) + amount)
  redis.call('HSET', hash, f .. 'l', tostring(level), f .. 't', tostring(NOW))
  redis.call('PEXPIRE', hash, 120000)
end

-- Members: leases held (expired ones dropped first), and whether a pause or budget holds them back.
local MEMBERS = {}
local function member(name)
  local s = MEMBERS[name]
  if s then return s end
  local cfg = TOPO.members[name]
  local leases = P .. ':l:' .. name
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', NOW)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', NOW)
    for _, ticket in ipairs(expired) do
      forget_ticket(ticket, redis.call('HGET', P .. ':t:' .. ticket, 'rep'))
    end
  end
  local paused = redis.call('PTTL', P .. ':pause:' .. name)
  s = {name = name, busy = redis.call('ZCARD', leases), max = cfg[1], reserved = cfg[2], rpm = cfg[3], tpm = cfg[4],
       paused = paused > 0 and paused or 0}
  MEMBERS[name] = s
  return s
end

-- The member a ticket goes to now (affinity within its bound, else the least loaded), or nil and how many ms
-- until a budget or pause lets one take it (nil: only a freed slot will).
local AFFINITY_LOAD_FACTOR = 1.25
local function pick(pool, info)
  local names = TOPO.pools[pool]
  local free, hold = {}, nil
  local busy, capacity = 0, 0
  for _, name in ipairs(names) do
    local s = member(name)
    busy, capacity = busy + s.busy, capacity + s.max
    local room = s.max - s.busy - (info.rank > 0 and s.reserved or 0)
    if room > 0 then
      local wait = s.paused
      local budgets = P .. ':b:' .. name
      if s.rpm > 0 then wait = math.max(wait, bucket_wait(bucket_level(budgets, 'r', s.rpm), 1, s.rpm)) end
      if s.tpm > 0 and info.cost > 0 then
        wait = math.max(wait, bucket_wait(bucket_level(budgets, 't', s.tpm), info.cost, s.tpm))
      end
      if wait > 0 then
        if not hold or wait < hold then hold = wait end
      else
        free[#free + 1] = s
      end
    end
  end
  if #free == 0 then return nil, hold end
  if #free > 1 and info.avoid ~= '' then
    for i, s in ipairs(free) do
      if s.name == info.avoid then table.remove(free, i) break end
    end
  end
  if info.aff ~= '' then
    local last = redis.call('GET', P .. ':aff:' .. pool .. ':' .. info.aff)
    for _, s in ipairs(free) do
      if s.name == last and s.busy + 1 <= math.ceil(AFFINITY_LOAD_FACTOR * (busy + 1) * s.max / capacity) then
        return s, nil
      end
    end
  end
  local best = free[1]
  for _, s in ipairs(free) do
    if s.busy / s.max < best.busy / best.max then best = s end
  end
  return best, nil
end

-- Raise the tickets whose wait earned them a level (QUEUE_AGING_SECONDS), as the in-process queue does.
local function promote(pool)
  local aging = TOPO.aging
  if aging <= 0 then return end
  local ages = P .. ':age:' .. pool
  for _, ticket in ipairs(redis.call('ZRANGEBYSCORE', ages, '-inf', NOW)) do
    local info = ticket_info(ticket)
    if not info then
      redis.call('ZREM', ages, ticket)
    else
      local level = math.max(0, info.prio - math.floor((NOW - info.arr) / aging))
      if level < info.rank then
        leave_level(pool, info.rank, info.key)
        redis.call('ZADD', P .. ':q:' .. pool, join_level(pool, level, info.key, false), ticket)
        redis.call('HSET', P .. ':t:' .. ticket, 'rank', level)
      end
      if level > 0 then
        redis.call('ZADD', ages, info.arr + (info.prio - level + 1) * aging, ticket)
      else
        redis.call('ZREM', ages, ticket)
      end
    end
  end
end

-- The best live head of a pool's queue; tickets of replicas that are gone are dropped on the way.
local function head(pool)
  local queue = P .. ':q:' .. pool
  while true do
    local top = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
    if #top == 0 then return nil end
    local ticket, score = top[1], tonumber(top[2])
    local info = ticket_info(ticket)
    if info and alive(info.rep) then return ticket, score, info end
    if info then
      unqueue(pool, ticket, info)
      forget_id(info.rid, info.key, info.rep)
      forget_ticket(ticket, info.rep)
    else
      redis.call('ZREM', queue, ticket)
    end
  end
end

-- Give `ticket` a slot at member `s`: a lease, its budgets taken; the grant goes back to the caller (in `mine`,
-- flat: ticket, member) or to its own replica's inbox.
local function lease(pool, ticket, info, s, mine)
  redis.call('ZADD', P .. ':l:' .. s.name, NOW + TOPO.ttl, ticket)
  redis.call('HSET', P .. ':t:' .. ticket, 'mem', s.name)
  s.busy = s.busy + 1
  local budgets = P .. ':b:' .. s.name
  if s.rpm > 0 then bucket_add(budgets, 'r', s.rpm, -1) end
  if s.tpm > 0 and info.cost > 0 then bucket_add(budgets, 't', s.tpm, -info.cost) end
  if info.aff ~= '' then redis.call('SET', P .. ':aff:' .. pool .. ':' .. info.aff, s.name, 'EX', 3600) end
  if info.rep == CALLER then
    mine[#mine + 1] = ticket
    mine[#mine + 1] = s.name
  else
    redis.call('RPUSH', P .. ':in:' .. info.rep, 'g|' .. ticket .. '|' .. s.name)
  end
end

-- Hand free slots to the best tickets of all pools, in one global order. Grants for the caller are returned
-- (flat: ticket, member, ...); others are pushed to their replica's inbox. Also returns the ms until a
-- budget or pause lets the next one go (0: none holds).
local function grant()
  local mine, hold = {}, nil
  for pool, _ in pairs(TOPO.pools) do promote(pool) end
  while true do
    local best = nil
    for pool, _ in pairs(TOPO.pools) do
      local ticket, score, info = head(pool)
      if ticket and (not best or score < best.score or (score == best.score and ticket < best.ticket)) then
        local chosen, wait = pick(pool, info)
        if chosen then
          best = {pool = pool, ticket = ticket, score = score, info = info, member = chosen}
        elseif wait and (not hold or wait < hold) then
          hold = wait
        end
      end
    end
    if not best then break end
    local info = best.info
    unqueue(best.pool, best.ticket, info)
    local turns = P .. ':turns:' .. best.pool
    local turn = best.score - info.rank * LEVEL - OFFSET
    if turn > tonumber(redis.call('HGET', turns, 'r' .. info.rank) or '0') then
      redis.call('HSET', turns, 'r' .. info.rank, tostring(turn))
    end
    lease(best.pool, best.ticket, info, best.member, mine)
  end
  return mine, hold or 0
end

local WAITING = {}  -- tickets waiting by pool, as queued_total() counted them
local function queued_total()
  local total = 0
  for pool, _ in pairs(TOPO.pools) do
    WAITING[pool] = redis.call('ZCARD', P .. ':q:' .. pool)
    total = total + WAITING[pool]
  end
  return total
end

local function remember(rid, key, record)
  if record == '' then return end
  local history = P .. ':h:' .. rid
  redis.call('HSET', history, key, record)
  redis.call('PEXPIRE', history, TOPO.history_ttl)
  local names = P .. ':hz'
  redis.call('ZADD', names, NOW, key .. '|' .. rid)
  local extra = redis.call('ZCARD', names) - TOPO.history
  if extra > 0 then
    for _, name in ipairs(redis.call('ZRANGE', names, 0, extra - 1)) do
      local bar = string.match(name, '^.*()|')  -- the last bar: a key's name may hold one, an id never does
      redis.call('HDEL', P .. ':h:' .. string.sub(name, bar + 1), string.sub(name, 1, bar - 1))
    end
    redis.call('ZREMRANGEBYRANK', names, 0, extra - 1)
  end
end
