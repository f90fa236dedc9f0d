-- A request let go of its slot: free the lease, settle the member's token budget, and grant the next.
-- ARGV: 4 ticket, 5 member, 6 key name, 7 request id, 8 '1' if the request ended (else it waits again),
-- 9 its final record ('' none), 10 tokens charged, 11 tokens used (-1: unknown).
-- Returns {hold ms, granted ticket, member, ...}.
local ticket, name = ARGV[4], ARGV[5]
redis.call('ZREM', P .. ':l:' .. name, ticket)
local cfg = TOPO.members[name]
local charged, used = tonumber(ARGV[10]), tonumber(ARGV[11])
if cfg and cfg[4] > 0 and used >= 0 and used ~= charged then
  bucket_add(P .. ':b:' .. name, 't', cfg[4], charged - used)
end
if ARGV[8] == '1' then
  forget_ticket(ticket, CALLER)
  forget_id(ARGV[7], ARGV[6], CALLER)
  remember(ARGV[7], ARGV[6], ARGV[9])
else
  forget_ticket(ticket, CALLER)
end
local mine, hold = grant()
local out = {hold}
for _, v in ipairs(mine) do out[#out + 1] = v end
return out
