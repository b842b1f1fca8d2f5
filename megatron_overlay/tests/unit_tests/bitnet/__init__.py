# Copyright (c) 2026 NVIDIA CORPORATION & AFFILIATES. All rights reserved.
