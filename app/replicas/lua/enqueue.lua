-- Admit a request's ticket to its pool's queue, then grant what the slots allow.
-- ARGV: 4 pool, 5 rank, 6 priority rank, 7 key name ('' none), 8 cost, 9 request id, 10 conversation ('' none),
-- 11 MAX_QUEUE_SIZE, 12 the key's max_queued (0: none), 13 '0' to check, '1' to skip the checks and go first
-- (a request that failed at a member), '2' to skip them (it waited already), 14 the member to avoid ('' none),
-- 15 a name the replica gives it, unique in the replica (the sequence restarts with a Redis that restarted).
-- Returns {'ok', ticket, hold ms, granted ticket, member, ...} or {refusal}: 'conflict', 'full', 'key_queue_limit'.
local pool, rank, prio, key = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local rid, first = ARGV[9], ARGV[13] == '1'
local ids = P .. ':id:' .. rid
if not first then
  local owner = redis.call('HGET', ids, key)
  if owner and owner ~= CALLER and alive(owner) then return {'conflict'} end
  if queued_total() >= tonumber(ARGV[11]) then return {'full'} end
  local most = tonumber(ARGV[12])
  if key ~= '' and most > 0 and tonumber(redis.call('HGET', P .. ':kw', key) or '0') >= most then
    return {'key_queue_limit'}
  end
end
promote(pool)  -- those who earned a level go ahead of this newcomer
local ticket = string.format('%015d', redis.call('INCR', P .. ':seq')) .. '|' .. CALLER .. '|' .. ARGV[15]
redis.call('HSET', P .. ':t:' .. ticket, 'rep', CALLER, 'pool', pool, 'rank', rank, 'prio', prio, 'key', key,
  'cost', ARGV[8], 'rid', rid, 'avoid', ARGV[14], 'aff', ARGV[10], 'arr', NOW)
redis.call('SADD', P .. ':mine:' .. CALLER, ticket)
redis.call('HSET', ids, key, CALLER)
local mine, hold = {}, 0
local info = {rep = CALLER, rank = rank, cost = tonumber(ARGV[8]), avoid = ARGV[14], aff = ARGV[10]}
local at_once = nil
local waiting = WAITING[pool] or redis.call('ZCARD', P .. ':q:' .. pool)  -- counted already by the checks
if waiting == 0 then
  at_once = pick(pool, info)  -- nothing waits here: a free slot is its own at once
end
if at_once then
  lease(pool, ticket, info, at_once, mine)
else
  redis.call('ZADD', P .. ':q:' .. pool, join_level(pool, rank, key, first), ticket)
  if key ~= '' then redis.call('HINCRBY', P .. ':kw', key, 1) end
  if TOPO.aging > 0 and rank > 0 then
    redis.call('ZADD', P .. ':age:' .. pool, NOW + (prio - rank + 1) * TOPO.aging, ticket)
  end
  mine, hold = grant()
end
local out = {'ok', ticket, hold}
for _, v in ipairs(mine) do out[#out + 1] = v end
return out
