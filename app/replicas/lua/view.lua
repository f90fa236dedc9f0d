-- The shared state for status and metrics: waiting tickets by pool and level, leases by member, replicas.
-- Returns JSON {"waiting": {pool: [n by level]}, "running": {member: n}, "replicas": [description, ...]}.
local waiting, running, replicas = {}, {}, {}
for pool, _ in pairs(TOPO.pools) do
  local queue, counts = P .. ':q:' .. pool, {}
  for rank = 0, TOPO.levels - 1 do
    counts[#counts + 1] = redis.call('ZCOUNT', queue, rank * LEVEL, '(' .. tostring((rank + 1) * LEVEL))
  end
  waiting[pool] = counts
end
for name, _ in pairs(TOPO.members) do running[name] = member(name).busy end
for _, id in ipairs(redis.call('SMEMBERS', P .. ':reps')) do
  local description = redis.call('GET', P .. ':rep:' .. id)
  if description then replicas[#replicas + 1] = description else redis.call('SREM', P .. ':reps', id) end
end
return cjson.encode({waiting = waiting, running = running, replicas = replicas})
