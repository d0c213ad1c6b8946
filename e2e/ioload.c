/* The end-to-end guest's disk workload: 4 KiB direct reads of a block
 * device, sequential or random, at a queue depth (threads, each with one
 * read in flight), like `fio --direct=1 --bs=4k --iodepth=N` without fio.
 * Built static into the guest's initramfs (e2e/guest.py).
 *
 *     ioload DEVICE seq|rand IODEPTH READS
 *     ioload DEVICE fill|verify IODEPTH GENERATION
 *
 * Prints one line: reads, seconds, IOPS.  Random offsets come from a fixed
 * seed per thread: every run reads the same blocks.
 *
 * fill writes every block of the device with a pattern that is a function
 * of the block's number and GENERATION; verify reads every block back and
 * exits 1 at the first that differs, so a lost, misplaced, torn or stale
 * write is found without keeping checksums anywhere.  Thread i of IODEPTH
 * takes blocks i, i + IODEPTH, ... */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BS 4096

static int fd;
static int random_offsets;
static int mode_fill, mode_verify;
static uint64_t generation;
static uint64_t blocks;
static long per_thread;

/* The expected content of a block: splitmix64 of (generation, block, word). */
static void pattern(uint64_t block, uint64_t *words)
{
	for (int i = 0; i < BS / 8; i++) {
		uint64_t z = (generation << 48) ^ (block << 9) ^ (uint64_t)i;

		z += 0x9e3779b97f4a7c15ull;
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		words[i] = z ^ (z >> 31);
	}
}

static long depth_all;

static void *filler(void *arg)
{
	long id = (long)arg;
	uint64_t *buf, *want;

	if (posix_memalign((void **)&buf, BS, BS) || posix_memalign((void **)&want, BS, BS))
		return (void *)1;
	for (uint64_t block = (uint64_t)id; block < blocks; block += (uint64_t)depth_all) {
		pattern(block, want);
		if (mode_fill) {
			if (pwrite(fd, want, BS, (off_t)(block * BS)) != BS) {
				perror("ioload: pwrite");
				return (void *)1;
			}
			continue;
		}
		if (pread(fd, buf, BS, (off_t)(block * BS)) != BS) {
			perror("ioload: pread");
			return (void *)1;
		}
		if (memcmp(buf, want, BS)) {
			fprintf(stderr, "ioload: verify: block %llu differs\n",
				(unsigned long long)block);
			return (void *)1;
		}
	}
	free(buf);
	free(want);
	return NULL;
}

static void *reader(void *arg)
{
	long id = (long)arg;
	uint64_t state = 0x9e3779b97f4a7c15ull * (uint64_t)(id + 1);
	void *buf;

	if (posix_memalign(&buf, BS, BS))
		return (void *)1;
	for (long i = 0; i < per_thread; i++) {
		uint64_t block;

		if (random_offsets) {
			state ^= state << 13;     /* xorshift64 */
			state ^= state >> 7;
			state ^= state << 17;
			block = state % blocks;
		} else {
			block = ((uint64_t)id * per_thread + (uint64_t)i) % blocks;
		}
		if (pread(fd, buf, BS, (off_t)(block * BS)) != BS) {
			perror("ioload: pread");
			return (void *)1;
		}
	}
	free(buf);
	return NULL;
}

int main(int argc, char **argv)
{
	struct timespec t0, t1;
	uint64_t bytes;
	long depth, reads;
	pthread_t *threads;
	int failed = 0;

	if (argc != 5 || (strcmp(argv[2], "seq") && strcmp(argv[2], "rand") &&
			  strcmp(argv[2], "fill") && strcmp(argv[2], "verify"))) {
		fprintf(stderr, "usage: ioload DEVICE seq|rand IODEPTH READS\n"
			"       ioload DEVICE fill|verify IODEPTH GENERATION\n");
		return 2;
	}
	random_offsets = !strcmp(argv[2], "rand");
	mode_fill = !strcmp(argv[2], "fill");
	mode_verify = !strcmp(argv[2], "verify");
	depth = atol(argv[3]);
	reads = atol(argv[4]);
	if (mode_fill || mode_verify) {
		generation = (uint64_t)reads;
		reads = depth;          /* the block count decides below */
	}
	if (depth < 1 || reads < depth) {
		fprintf(stderr, "ioload: need 1 <= IODEPTH <= READS\n");
		return 2;
	}
	fd = open(argv[1], (mode_fill ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		perror(argv[1]);
		return 1;
	}
	off_t end = lseek(fd, 0, SEEK_END);     /* a block device's size too */
	if (end < BS) {
		fprintf(stderr, "ioload: %s: smaller than one block\n", argv[1]);
		return 1;
	}
	bytes = (uint64_t)end;
	blocks = bytes / BS;
	per_thread = reads / depth;
	depth_all = depth;
	threads = calloc(depth, sizeof(*threads));
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (long i = 0; i < depth; i++)
		pthread_create(&threads[i], NULL, mode_fill || mode_verify ? filler : reader,
			       (void *)i);
	for (long i = 0; i < depth; i++) {
		void *ret;

		pthread_join(threads[i], &ret);
		failed |= ret != NULL;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	if (mode_fill || mode_verify) {
		if (mode_fill && fsync(fd))
			failed = 1;
		printf("ioload: %s %s iodepth %ld generation %llu: %llu blocks %s in %.3f s\n",
		       argv[1], argv[2], depth, (unsigned long long)generation,
		       (unsigned long long)blocks,
		       failed ? "FAILED" : mode_fill ? "written" : "match", s);
		return failed;
	}
	printf("ioload: %s %s iodepth %ld: %ld reads in %.3f s, %.0f IOPS\n", argv[1],
	       argv[2], depth, per_thread * depth, s, per_thread * depth / s);
	return failed;
}
