-- A replica (re)joins: what Redis still holds of it from before is dropped, then the requests it runs now
-- take their slots again and those it has waiting queue again (queued by enqueue.lua, in their order).
-- ARGV: 4 the replica's description (JSON), 5.. ticket, member, key name, request id of each running request.
-- Returns the number of stale tickets dropped.
local mine = P .. ':mine:' .. CALLER
local stale = redis.call('SMEMBERS', mine)
for _, ticket in ipairs(stale) do
  local info = ticket_info(ticket)
  local held = redis.call('HGET', P .. ':t:' .. ticket, 'mem')
  if held then
    redis.call('ZREM', P .. ':l:' .. held, ticket)
  elseif info then
    unqueue(info.pool, ticket, info)
  end
  if info then forget_id(info.rid, info.key, CALLER) end
  redis.call('DEL', P .. ':t:' .. ticket)
end
redis.call('DEL', mine)
redis.call('SET', P .. ':rep:' .. CALLER, ARGV[4], 'PX', TOPO.ttl)
redis.call('SADD', P .. ':reps', CALLER)
for i = 5, #ARGV, 4 do
  local ticket, name = ARGV[i], ARGV[i + 1]
  redis.call('HSET', P .. ':t:' .. ticket, 'rep', CALLER, 'mem', name, 'key', ARGV[i + 2], 'rid', ARGV[i + 3])
  redis.call('ZADD', P .. ':l:' .. name, NOW + TOPO.ttl, ticket)
  redis.call('SADD', mine, ticket)
  redis.call('HSET', P .. ':id:' .. ARGV[i + 3], ARGV[i + 2], CALLER)
end
return #stale
