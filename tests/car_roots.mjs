// Read a CAR file with @ipld/car (the reference JavaScript implementation, not grid_ipfs's reader) and
// print {"roots": [CID...], "blocks": [CID...], "bad": [CID...]} as JSON: the CIDs as the library
// prints them, in file order; `bad` lists the blocks whose bytes do not hash to their (sha2-256) CID.
// Usage: node tests/car_roots.mjs FILE.car
import { readFile } from 'node:fs/promises'
import { CarReader } from '@ipld/car'
import { sha256 } from 'multiformats/hashes/sha2'

const equal = (a, b) => a.length === b.length && a.every((x, i) => x === b[i])

const reader = await CarReader.fromBytes(await readFile(process.argv[2]))
const roots = (await reader.getRoots()).map((cid) => cid.toString())
const blocks = []
const bad = []
for await (const { cid, bytes } of reader.blocks()) {
  blocks.push(cid.toString())
  const digest = await sha256.digest(bytes)
  if (cid.multihash.code !== sha256.code || !equal(digest.digest, cid.multihash.digest)) bad.push(cid.toString())
}
process.stdout.write(JSON.stringify({ roots, blocks, bad }) + '\n')
