/* The cheapest VMM there is: what one guest access costs the vCPU thread
 * when nothing but C sits between KVM_RUN calls.  A yardstick for the demo's
 * Python VMM and for the per-exit figures in bench/RESULTS.md; not part of
 * `make bench` (its noise here is as wide as the demo's).
 *
 *     exit_loop userspace [PASSES [ACCESSES]]   MMIO write, MMIO read,
 *                                               PIO OUT, PIO IN, in a loop:
 *                                               each one exits to us
 *     exit_loop in-kernel [PASSES [ACCESSES]]   ioeventfd doorbell writes
 *                                               (no exit; one PIO OUT per
 *                                               BATCH of them to count)
 *
 * Prints one line per pass: ns of this thread's CPU time per access. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE 0x1000
#define DEVICE 0xd0000000u      /* no memory slot: MMIO exits to us */
#define DOORBELL 0xd0001000u    /* an ioeventfd: served in kvm.ko */
#define PORT 0x510              /* no in-kernel device (no irqchip made) */
#define BATCH 20000

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static double thread_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

/* 32-bit flat-mode guest code, assembled by hand. */
static uint8_t *emit(uint8_t *p, const void *bytes, size_t n)
{
	memcpy(p, bytes, n);
	return p + n;
}

static uint8_t *emit32(uint8_t *p, uint8_t opcode, uint32_t imm)
{
	*p++ = opcode;
	return emit(p, &imm, 4);
}

static uint8_t *emit_jump_back(uint8_t *p, uint8_t opcode, const uint8_t *target)
{
	*p++ = opcode;
	*p = (uint8_t)(target - (p + 1));
	return p + 1;
}

static const uint8_t SET_DX_PORT[] = {0x66, 0xba, PORT & 0xff, PORT >> 8};  /* mov dx, PORT */

static void userspace_loop(uint8_t *p)
{
	const uint8_t *top = p;

	p = emit32(p, 0xa3, DEVICE);            /* mov [DEVICE], eax */
	p = emit32(p, 0xa1, DEVICE + 4);        /* mov eax, [DEVICE + 4] */
	p = emit(p, SET_DX_PORT, sizeof(SET_DX_PORT));
	*p++ = 0xee;                            /* out dx, al */
	*p++ = 0xec;                            /* in al, dx */
	emit_jump_back(p, 0xeb, top);           /* jmp top */
}

static void doorbell_loop(uint8_t *p)
{
	const uint8_t *outer = p, *inner;

	p = emit32(p, 0xb9, BATCH);             /* mov ecx, BATCH */
	inner = p;
	p = emit32(p, 0xa3, DOORBELL);          /* mov [DOORBELL], eax */
	p = emit_jump_back(p, 0xe2, inner);     /* loop inner */
	p = emit(p, SET_DX_PORT, sizeof(SET_DX_PORT));
	*p++ = 0xee;                            /* out dx, al: BATCH done */
	emit_jump_back(p, 0xeb, outer);         /* jmp outer */
}

static void flat_mode(int vcpu)
{
	struct kvm_sregs sregs;
	struct kvm_segment seg = {.limit = 0xffffffff, .selector = 0x10, .present = 1,
				  .type = 3, .db = 1, .s = 1, .g = 1};
	struct kvm_regs regs = {.rip = CODE, .rflags = 2};

	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = seg;
	seg.type = 11;
	seg.selector = 0x8;
	sregs.cs = seg;
	sregs.cr0 |= 1;                         /* protected mode, no paging */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");
}

int main(int argc, char **argv)
{
	int in_kernel = argc > 1 && !strcmp(argv[1], "in-kernel");
	int passes = argc > 2 ? atoi(argv[2]) : 5;
	long accesses = argc > 3 ? atol(argv[3]) : (in_kernel ? 1000000 : 50000);
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int vm, vcpu, run_size;
	uint8_t *mem;
	struct kvm_run *run;

	if (kvm < 0)
		die("/dev/kvm");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	struct kvm_userspace_memory_region region = {.memory_size = MEM_SIZE,
						     .userspace_addr = (uintptr_t)mem};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	if (in_kernel) {
		struct kvm_ioeventfd doorbell = {.addr = DOORBELL, .len = 4,
						 .fd = eventfd(0, EFD_CLOEXEC)};
		if (ioctl(vm, KVM_IOEVENTFD, &doorbell) < 0)
			die("KVM_IOEVENTFD");
		doorbell_loop(mem + CODE);
	} else {
		userspace_loop(mem + CODE);
	}
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vcpu < 0 || run_size <= 0)
		die("KVM_CREATE_VCPU");
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	flat_mode(vcpu);
	/* Fault the kvm_run page in: until then a tracer cannot read the first
	 * exit's kvm_run from BPF and has to infer it (README, Limits). */
	run->immediate_exit = 0;

	for (int pass = 0; pass < passes; pass++) {
		long done = 0;
		double t = thread_ns();

		while (done < accesses) {
			if (ioctl(vcpu, KVM_RUN, 0) < 0)
				die("KVM_RUN");
			if (run->exit_reason == KVM_EXIT_MMIO) {
				if (!run->mmio.is_write)
					memset(run->mmio.data, 0, sizeof(run->mmio.data));
				done++;
			} else if (run->exit_reason == KVM_EXIT_IO) {
				if (run->io.direction == KVM_EXIT_IO_IN)
					memset((char *)run + run->io.data_offset, 0, run->io.size);
				done += in_kernel ? BATCH : 1;
			} else {
				fprintf(stderr, "exit_loop: unexpected exit %u\n", run->exit_reason);
				return 1;
			}
		}
		printf("%.1f\n", (thread_ns() - t) / done);
	}
	return 0;
}
