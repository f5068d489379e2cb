/*
 * kvm-probe.img: a 512-byte boot sector that proves a hypervisor can really run a guest.
 *
 * Booted by SeaBIOS from an IDE disk (as libvirt guests are), it walks through what a Linux
 * kernel does before its first message: real mode, a BIOS timer interrupt, protected mode,
 * long mode with paging, Linux's boot trampoline (back to 32-bit, paging off and on again),
 * and it touches 64 MiB of guest memory that a page-fault handler maps on demand, 2 MiB at a
 * time, as Linux's decompressor does. It writes one letter per stage to COM1
 * ("RTPLXYMMMMMMMM\n") and leaves through QEMU's isa-debug-exit device (exit status 33).
 *
 * Rebuild: as --32 -o p.o kvm-probe.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o kvm-probe.img p.o
 */
.code16
.globl _start
_start:
  cli
  xor %ax,%ax
  mov %ax,%ds
  mov %ax,%es
  mov %ax,%ss
  mov $0x7c00,%sp
  mov $0x3f8,%dx
  mov $'R',%al
  out %al,%dx
  /* two ticks of the BIOS timer: interrupts are delivered */
  sti
  mov 0x46c,%bx
  add $2,%bx
1: hlt
  cmp 0x46c,%bx
  jne 1b
  cli
  mov $'T',%al
  out %al,%dx
  lgdtl gdtr
  mov %cr0,%eax
  or $1,%eax
  mov %eax,%cr0
  ljmpl $0x08,$pm
.code32
pm:
  mov $0x10,%ax
  mov %ax,%ds
  mov %ax,%es
  mov %ax,%ss
  mov $'P',%al
  out %al,%dx
  /* identity map of the first 2 MiB: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000; the rest on demand */
  mov $0x1000,%edi
  xor %eax,%eax
  mov $0xc00,%ecx
  rep stosl
  movl $0x2003,0x1000
  movl $0x3003,0x2000
  movl $0x83,0x3000
  mov $0x1000,%eax
  mov %eax,%cr3
  mov %cr4,%eax
  or $0x20,%eax
  mov %eax,%cr4
  mov $0xc0000080,%ecx
  rdmsr
  or $0x100,%eax
  wrmsr
  mov %cr0,%eax
  or $0x80000000,%eax
  mov %eax,%cr0
  ljmp $0x18,$lm
.code64
lm:
  mov $0x3f8,%dx  /* rdmsr/wrmsr used edx */
  mov $'L',%al
  out %al,%dx
  /* Linux's boot trampoline: 32-bit compatibility mode, paging off, paging on, 64-bit again */
  lea tramp(%rip),%rax
  pushq $0x08
  pushq %rax
  lretq
.code32
tramp:
  mov %cr0,%eax
  and $0x7fffffff,%eax
  mov %eax,%cr0
  mov $'X',%al
  out %al,%dx
  mov %cr0,%eax
  or $0x80000000,%eax
  mov %eax,%cr0
  ljmp $0x18,$lm2
.code64
lm2:
  mov $'Y',%al
  out %al,%dx
  /* IDT at 0x5000 with one gate: page faults (vector 14) go to pf */
  lea pf(%rip),%rax
  mov $0x5000+14*16,%rdi
  mov %ax,(%rdi)
  movw $0x18,2(%rdi)
  movw $0x8e00,4(%rdi)
  shr $16,%rax
  mov %ax,6(%rdi)
  movl $0,8(%rdi)
  movl $0,12(%rdi)
  lidt idtr(%rip)
  mov $0x3f8,%dx
  /* touch 64 MiB from 2 MiB on, one write per 4 KiB page (a page fault per new 2 MiB), a letter per 8 MiB */
  mov $0x200000,%rdi
  mov $8,%r8
3: mov $2048,%rcx
4: movb $1,(%rdi)
  add $4096,%rdi
  loop 4b
  mov $0x3f8,%dx
  mov $'M',%al
  out %al,%dx
  dec %r8
  jnz 3b
  mov $'\n',%al
  out %al,%dx
  mov $0xf4,%dx
  mov $0x10,%al
  out %al,%dx
5: hlt
  jmp 5b
/* page-fault handler: map the 2 MiB around the faulting address (CR2), return to retry */
pf:
  push %rax
  push %rbx
  mov %cr2,%rax
  shr $21,%rax
  mov %rax,%rbx
  shl $21,%rax
  or $0x83,%rax
  mov %rax,0x3000(,%rbx,8)
  pop %rbx
  pop %rax
  add $8,%rsp
  iretq
idtr:
  .word 256*16-1
  .quad 0x5000
.p2align 3
gdt:
  .quad 0
  .quad 0x00cf9a000000ffff  /* 0x08: 32-bit code */
  .quad 0x00cf92000000ffff  /* 0x10: data */
  .quad 0x00af9a000000ffff  /* 0x18: 64-bit code */
gdtr:
  .word gdtr-gdt-1
  .long gdt
.org 510
.byte 0x55,0xaa
