/* SPDX-License-Identifier: GPL-2.0 OR BSD-2-Clause */
/* Minimal stand-in for the kernel's linux/types.h: the vendored UAPI headers
 * need these names and nothing else, and a BPF target must not pull the
 * host's asm/ headers (their contents differ between distributions, which
 * would make the committed objects depend on the build machine). */
#ifndef __MHBPF_LINUX_TYPES_H
#define __MHBPF_LINUX_TYPES_H

typedef signed char __s8;
typedef unsigned char __u8;
typedef short __s16;
typedef unsigned short __u16;
typedef int __s32;
typedef unsigned int __u32;
typedef long long __s64;
typedef unsigned long long __u64;

typedef __u16 __le16;
typedef __u16 __be16;
typedef __u32 __le32;
typedef __u32 __be32;
typedef __u64 __le64;
typedef __u64 __be64;
typedef __u16 __sum16;
typedef __u32 __wsum;

#define __aligned_u64 __u64 __attribute__((aligned(8)))
#define __bitwise

#endif
