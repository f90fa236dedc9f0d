-- A replica's heartbeat: it is alive (for LEASE_TTL), its leases are renewed, and the slots of replicas that
-- died (their leases expired) go to whoever waits.
-- ARGV: 4 the replica's description (JSON), 5.. ticket, member pairs of the requests it runs.
-- Returns {leases lost, hold ms, granted ticket, member, ...}.
redis.call('SET', P .. ':rep:' .. CALLER, ARGV[4], 'PX', TOPO.ttl)
redis.call('SADD', P .. ':reps', CALLER)
local lost = 0
for i = 5, #ARGV, 2 do
  if redis.call('ZADD', P .. ':l:' .. ARGV[i + 1], 'XX', 'CH', NOW + TOPO.ttl, ARGV[i]) == 0 then lost = lost + 1 end
end
local mine, hold = grant()
local out = {lost, hold}
for _, v in ipairs(mine) do out[#out + 1] = v end
return out
