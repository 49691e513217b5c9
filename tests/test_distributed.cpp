// Data parallelism: the launchers' variables, the split of the data, the gradient sum over Gloo
// (threads of this process as the ranks), and whole runs with two ranks on localhost:
// caption-train equal to one process with the global batch, a killed rank, resume with the same
// and another world size, the feature cache built by both ranks, caption's shards.
#include <unistd.h>

#include <chrono>
#include <exception>
#include <filesystem>
#include <map>
#include <thread>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/errors.h"
#include "core/weights.h"
#include "pipeline/captioner.h"
#include "pipeline/distributed.h"
#include "test_bundles.h"
#include "test_process.h"
#include "train_helpers.h"

using namespace prefixcap;
using namespace prefixcap::testing;
namespace fs = std::filesystem;

namespace {

DistEnv env_of(const std::map<std::string, std::string>& vars) {
  return DistEnv::from_variables([&](const char* k) -> const char* {
    auto it = vars.find(k);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

// Runs body(rank, communicator) on two threads, each one rank of a Gloo group on localhost;
// rethrows the first exception.
void two_ranks(const std::function<void(int, std::unique_ptr<Communicator>&)>& body, std::chrono::seconds timeout = std::chrono::seconds(30)) {
  const int port = free_local_port();
  std::exception_ptr error[2];
  std::thread threads[2];
  for (int r = 0; r < 2; ++r)
    threads[r] = std::thread([&, r] {
      try {
        DistEnv e;
        e.rank = e.local_rank = r;
        e.world_size = e.local_world_size = 2;
        e.master_port = port;
        auto comm = Communicator::create(e, "gloo", timeout);
        body(r, comm);
      } catch (...) {
        error[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : error)
    if (e) std::rethrow_exception(e);
}

// A small network: two linear layers, and a parameter only rank 0's loss uses (first, so that
// it lands in the last bucket: the buckets before it can start during backward on rank 1 too).
struct Net {
  std::vector<at::Tensor> params;
  Net() {
    static const std::vector<at::Tensor> initial = [] {
      at::manual_seed(1);
      return std::vector<at::Tensor>{at::randn({5}), at::randn({48, 16}), at::randn({48}), at::randn({4, 48})};
    }();
    for (const auto& p : initial) params.push_back(p.clone().set_requires_grad(true));
  }
  at::Tensor loss(const at::Tensor& x, bool use_extra) const {
    at::Tensor h = at::tanh(at::linear(x, params[1], params[2]));
    at::Tensor y = at::linear(h, params[3]).pow(2).mean();
    return use_extra ? y + params[0].sin().sum() : y;
  }
};

// Drawn once, before any rank thread runs (the generator is shared by the threads).
at::Tensor input_of(int rank, int micro) {
  static const std::vector<at::Tensor> inputs = [] {
    at::manual_seed(100);
    std::vector<at::Tensor> v;
    for (int i = 0; i < 4; ++i) v.push_back(at::randn({6, 16}));
    return v;
  }();
  return inputs[static_cast<size_t>(2 * rank + micro)];
}

// The variables torchrun gives rank `rank` of `world` on this machine.
std::vector<std::string> launcher_variables(int rank, int world, int port) {
  return {"RANK=" + std::to_string(rank),        "LOCAL_RANK=" + std::to_string(rank),
          "WORLD_SIZE=" + std::to_string(world), "LOCAL_WORLD_SIZE=" + std::to_string(world),
          "MASTER_ADDR=127.0.0.1",               "MASTER_PORT=" + std::to_string(port)};
}

std::string shell_env(int rank, int world, int port) {
  std::string out;
  for (const auto& v : launcher_variables(rank, world, port)) out += (out.empty() ? "" : " ") + v;
  return out;
}

std::vector<std::string> env_argv(int rank, int world, int port, const std::vector<std::string>& command) {
  std::vector<std::string> argv = {"/usr/bin/env"};
  for (auto& v : launcher_variables(rank, world, port)) argv.push_back(std::move(v));
  argv.insert(argv.end(), command.begin(), command.end());
  return argv;
}

TrainConfig dist_config(const TempDir& dir, const std::string& out) {
  TrainConfig c = tiny_config(dir, out);
  c.val_split = "train.jsonl";  // sharded validation: the loss and 8 captions each epoch
  c.mapper = {{"type", "transformer"}, {"prefix_length", 4}, {"clip_length", 4}, {"num_layers", 2}};
  c.lr = 1e-3;
  c.epochs = 4;
  c.num_threads = 1;   // every process alike, whatever the world size
  c.dist_bucket_mb = 1;
  c.dist_timeout = 30;
  return c;
}

std::string train_command(const std::string& config) {
  return std::string(PREFIXCAP_TRAIN_BIN) + " --config " + q(config);
}

TensorMap mapper_weights(const std::string& bundle) {
  Captioner cap = Captioner::load(bundle);
  return module_tensors(*cap.mapper);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// the launchers' variables

TEST(DistEnv, TorchrunMpirunAndSlurmVariables) {
  DistEnv none = env_of({});
  EXPECT_FALSE(none.distributed());
  EXPECT_EQ(none.launcher, "none");

  DistEnv t = env_of({{"RANK", "3"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                      {"MASTER_ADDR", "node7"}, {"MASTER_PORT", "1234"}});
  EXPECT_EQ(t.launcher, "torchrun");
  EXPECT_EQ(t.rank, 3);
  EXPECT_EQ(t.world_size, 4);
  EXPECT_EQ(t.local_rank, 1);
  EXPECT_EQ(t.local_world_size, 2);
  EXPECT_EQ(t.master_addr, "node7");
  EXPECT_EQ(t.master_port, 1234);

  DistEnv m = env_of({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                      {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
  EXPECT_EQ(m.launcher, "mpirun");
  EXPECT_EQ(m.rank, 1);
  EXPECT_EQ(m.master_addr, "127.0.0.1");  // one machine: the default is fine
  EXPECT_EQ(m.master_port, 29500);

  DistEnv p = env_of({{"PMI_RANK", "0"}, {"PMI_SIZE", "2"}});
  EXPECT_EQ(p.launcher, "mpirun");
  EXPECT_EQ(p.world_size, 2);

  DistEnv s = env_of({{"SLURM_PROCID", "5"}, {"SLURM_STEP_NUM_TASKS", "6"}, {"SLURM_LOCALID", "1"},
                      {"SLURM_STEP_TASKS_PER_NODE", "2(x3)"}, {"MASTER_ADDR", "10.0.0.1"}});
  EXPECT_EQ(s.launcher, "slurm");
  EXPECT_EQ(s.rank, 5);
  EXPECT_EQ(s.world_size, 6);
  EXPECT_EQ(s.local_rank, 1);
  EXPECT_EQ(s.local_world_size, 2);
  // sbatch's own variables (a batch script is no rank) start nothing
  EXPECT_FALSE(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}}).distributed());
  // torchrun's variables win over a surrounding Slurm job's
  EXPECT_EQ(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"SLURM_PROCID", "3"}, {"SLURM_STEP_NUM_TASKS", "4"}}).launcher, "torchrun");
}

TEST(DistEnv, MalformedOrIncompleteVariablesAreRefusedByName) {
  auto refused = [](const std::map<std::string, std::string>& vars, const std::string& needle) {
    const std::string m = message_of([&] { env_of(vars); });
    EXPECT_NE(m.find(needle), std::string::npos) << "message: '" << m << "'";
  };
  refused({{"RANK", "0"}}, "WORLD_SIZE");
  refused({{"WORLD_SIZE", "2"}}, "RANK");
  refused({{"RANK", "2"}, {"WORLD_SIZE", "2"}}, "RANK='2'");
  refused({{"RANK", "x"}, {"WORLD_SIZE", "2"}}, "RANK='x'");
  refused({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "70000"}}, "MASTER_PORT");
  refused({{"RANK", "0"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "2"}}, "MASTER_ADDR");
  refused({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "2"}, {"LOCAL_WORLD_SIZE", "2"}}, "LOCAL_RANK='2'");
}

TEST(DistSplit, RankSpansCoverEveryItemOnceInOrder) {
  for (int64_t n : {0, 1, 2, 5, 6, 7, 100})
    for (int world : {1, 2, 3, 8}) {
      int64_t next = 0;
      for (int r = 0; r < world; ++r) {
        Span s = rank_span(n, r, world);
        EXPECT_EQ(s.lo, next) << n << " " << world << " " << r;
        EXPECT_GE(s.size(), n / world);
        EXPECT_LE(s.size(), n / world + 1);
        next = s.hi;
      }
      EXPECT_EQ(next, n);
    }
}

// ---------------------------------------------------------------------------------------
// the gradient sum

TEST(GradientSync, BucketsStartedDuringBackwardSumEveryRanksAccumulatedGradients) {
  // Expected: each rank's gradient over two micro-batches, computed here without any exchange,
  // then summed. Rank 1 never uses the last parameter.
  std::vector<at::Tensor> expected;
  input_of(0, 0);
  Net{};
  for (int r = 0; r < 2; ++r) {
    Net net;
    for (int micro = 0; micro < 2; ++micro) net.loss(input_of(r, micro), r == 0).backward();
    for (size_t k = 0; k < net.params.size(); ++k) {
      at::Tensor g = net.params[k].grad().defined() ? net.params[k].grad() : at::zeros_like(net.params[k]);
      if (r == 0) expected.push_back(g.clone());
      else expected[k] += g;
    }
  }
  for (bool overlap : {true, false}) {
    two_ranks([&](int rank, std::unique_ptr<Communicator>& comm) {
      Net net;
      GradientSync sync(*comm, net.params, 1024, overlap);  // 1 KiB: {[4,48], [48]}, {[48,16]}, {[5]}
      EXPECT_EQ(sync.num_buckets(), 3u);
      EXPECT_EQ(sync.bytes_per_step(), (48 * 16 + 48 + 4 * 48 + 5) * 4);
      for (int step = 0; step < 2; ++step) {
        for (auto& p : net.params) p.mutable_grad() = at::Tensor();
        for (int micro = 0; micro < 2; ++micro) {
          sync.prepare(micro == 1);
          net.loss(input_of(rank, micro), rank == 0).backward();
        }
        sync.finish();
        EXPECT_EQ(sync.started_in_backward() > 0, overlap);
        for (size_t k = 0; k < net.params.size(); ++k)
          EXPECT_TRUE(at::allclose(net.params[k].grad(), expected[k], 1e-6, 1e-6)) << "rank " << rank << " parameter " << k;
      }
    });
  }
}

TEST(Communicator, APeerThatGoesAwayFailsTheCollectiveWithAClearError) {
  auto t0 = std::chrono::steady_clock::now();
  std::string message;
  two_ranks(
      [&](int rank, std::unique_ptr<Communicator>& comm) {
        comm->barrier();
        auto gathered = comm->allgather_bytes(rank == 0 ? std::string("") : std::string(3000, 'x'));
        EXPECT_EQ(gathered[0], "");
        EXPECT_EQ(gathered[1], std::string(3000, 'x'));
        if (rank == 1) {
          comm.reset();  // this rank is gone
          return;
        }
        at::Tensor t = at::ones({4});
        message = message_of([&] {
          for (int i = 0; i < 100; ++i) comm->allreduce_sum(t);
        });
      },
      std::chrono::seconds(10));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(message.find("rank 0 of 2: all-reduce failed"), std::string::npos) << message;
  EXPECT_LT(secs, 20);
}

// ---------------------------------------------------------------------------------------
// whole runs

TEST(DistributedTrain, TwoRanksWithBatchBEqualOneProcessWithBatch2B) {
  TempDir dir;
  make_corpus(dir);  // 8 items: global batches of 6 and 2 (the tail split 1 + 1)
  TrainConfig one = dist_config(dir, "one");
  one.batch_size = 6;
  write_json_file(dir.file("one.json"), one.to_json());
  ASSERT_EQ(run(train_command(dir.file("one.json")) + " 2>" + q(dir.file("one.err"))), 0) << read_bytes(dir.file("one.err"));
  TrainConfig two = dist_config(dir, "two");
  two.batch_size = 3;
  write_json_file(dir.file("two.json"), two.to_json());
  ASSERT_EQ(run(train_command(dir.file("two.json")) + " --nproc 2 2>" + q(dir.file("two.err"))), 0) << read_bytes(dir.file("two.err"));
  // Gradient accumulation means the same: two batches of 3 are one batch of 6.
  TrainConfig accum = dist_config(dir, "accum");
  accum.batch_size = 3;
  accum.grad_accum = 2;
  write_json_file(dir.file("accum.json"), accum.to_json());
  ASSERT_EQ(run(train_command(dir.file("accum.json")) + " 2>/dev/null"), 0);

  // Losses: relative 1e-5. Weights: relative L2 distance 1e-4 per tensor (AdamW divides each
  // component's step by its own gradient scale, so a component whose gradient is near zero can
  // step differently on rounding alone: measured 3.7e-5 at most, on values up to 0.09).
  const auto a = train_losses(dir.file("one/train_log.jsonl"));
  ASSERT_EQ(a.size(), 8u);  // 2 steps per epoch
  const TensorMap wa = mapper_weights(dir.file("one/bundle"));
  for (const char* other : {"two", "accum"}) {
    const auto b = train_losses(dir.file(std::string(other) + "/train_log.jsonl"));
    ASSERT_EQ(b.size(), a.size()) << other;
    for (const auto& [step, loss] : a) EXPECT_NEAR(b.at(step), loss, 1e-5 * loss) << other << " step " << step;
    const TensorMap wb = mapper_weights(dir.file(std::string(other) + "/bundle"));
    ASSERT_EQ(wa.size(), wb.size());
    for (const auto& [k, v] : wa)
      EXPECT_LE((wb.at(k) - v).norm().item<double>(), 1e-4 * v.norm().item<double>() + 1e-7) << other << " " << k;
  }
  // Validation, sharded over the ranks (each a block of the captions and the items), gives one
  // record per epoch with the loss of all of them and the metrics of all 8 captions.
  auto val_records = [&](const std::string& run_dir) {
    std::vector<Json> out;
    std::ifstream in(run_dir + "/train_log.jsonl");
    std::string line;
    while (std::getline(in, line))
      if (Json j = Json::parse(line); j["type"] == "val") out.push_back(j);
    return out;
  };
  const auto va = val_records(dir.file("one")), vb = val_records(dir.file("two"));
  ASSERT_EQ(va.size(), 4u);
  ASSERT_EQ(vb.size(), 4u);
  for (size_t e = 0; e < va.size(); ++e) {
    EXPECT_NEAR(vb[e]["loss"].get<double>(), va[e]["loss"].get<double>(), 1e-4 * va[e]["loss"].get<double>()) << "epoch " << e + 1;
    EXPECT_TRUE(vb[e].contains("CIDEr")) << vb[e].dump();
    EXPECT_EQ(vb[e]["samples"].size(), 3u);
  }
  EXPECT_TRUE(fs::exists(dir.file("two/best/captioner.json")));
  // Only rank 0 wrote: one log, one bundle; the log says how many ranks ran.
  EXPECT_NE(read_bytes(dir.file("two/train_log.jsonl")).find("\"world_size\":2"), std::string::npos);
  EXPECT_NE(read_bytes(dir.file("two/train_log.jsonl")).find("comm_bytes_per_step"), std::string::npos);
}

TEST(DistributedTrain, AKilledRankStopsTheOtherAndTheRunResumesExactly) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = dist_config(dir, "full");
  c.batch_size = 2;      // 2 global batches of 4 per epoch
  c.save_every_steps = 3;
  c.epochs = 3;
  write_json_file(dir.file("cfg.json"), c.to_json());
  const std::string cmd = train_command(dir.file("cfg.json"));
  ASSERT_EQ(run(cmd + " --nproc 2 2>/dev/null"), 0);
  const auto full = train_losses(dir.file("full/train_log.jsonl"));
  ASSERT_EQ(full.size(), 6u);

  // Two ranks started as a launcher would; rank 1 dies right after step 4.
  const std::string out = dir.file("killed");
  const int port = free_local_port();
  std::vector<std::unique_ptr<Child>> ranks;
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 2; ++r)
    ranks.push_back(std::make_unique<Child>(
        env_argv(r, 2, port, {"PREFIXCAP_FAULT_KILL_AT_STEP=4", "PREFIXCAP_FAULT_KILL_RANK=1", PREFIXCAP_TRAIN_BIN, "--config",
                              dir.file("cfg.json"), "--out", out}),
        dir.file("out" + std::to_string(r)), dir.file("err" + std::to_string(r))));
  EXPECT_EQ(ranks[1]->wait(120), 128 + SIGKILL);
  EXPECT_EQ(ranks[0]->wait(60), 2) << "rank 0 did not stop with an error after rank 1 died";
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 100);
  const std::string err0 = read_bytes(dir.file("err0"));
  EXPECT_NE(err0.find("rank 0 of 2"), std::string::npos) << err0;
  EXPECT_NE(err0.find("another rank stopped"), std::string::npos) << err0;
  EXPECT_EQ(read_bytes(out + "/checkpoints/latest"), "step-00000003\n");

  // Resumed with the same world size: the same losses, step for step.
  ASSERT_EQ(run(cmd + " --out " + q(out) + " --resume --nproc 2 2>/dev/null"), 0);
  EXPECT_EQ(train_losses(out + "/train_log.jsonl"), full);

  // From the same checkpoint with one process: the epoch continues where the two ranks were
  // (example 4 of 8 of epoch 2) with global batches of 2, and the schedule is recomputed.
  // Every rank of a fresh run killed after step 4: the checkpoint of step 3 remains.
  EXPECT_NE(run("PREFIXCAP_FAULT_KILL_AT_STEP=4 " + cmd + " --out " + q(dir.file("one")) + " --nproc 2 2>/dev/null"), 0);
  ASSERT_EQ(read_bytes(dir.file("one/checkpoints/latest")), "step-00000003\n");
  ASSERT_EQ(run(cmd + " --out " + q(dir.file("one")) + " --resume 2>" + q(dir.file("one.err"))), 0) << read_bytes(dir.file("one.err"));
  const std::string note = read_bytes(dir.file("one.err"));
  EXPECT_NE(note.find("the checkpoint's run had 2 rank(s), this one 1"), std::string::npos) << note;
  const auto resumed = train_losses(dir.file("one/train_log.jsonl"));
  // steps 1-3 from the two ranks, then epoch 2's second half (2 batches of 2) and epoch 3 (4 batches)
  ASSERT_EQ(resumed.size(), 9u);
  int64_t expect_step = 1;
  for (const auto& [step, loss] : resumed) EXPECT_EQ(step, expect_step++);
}

TEST(DistributedTrain, BothRanksFillTheFeatureCacheEachItsShare) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = dist_config(dir, "out");
  c.val_split = "";
  c.encode_batch = 2;
  write_json_file(dir.file("cfg.json"), c.to_json());
  ASSERT_EQ(run(train_command(dir.file("cfg.json")) + " --build-cache --nproc 2 2>" + q(dir.file("err"))), 0) << read_bytes(dir.file("err"));
  EXPECT_NE(read_bytes(dir.file("err")).find("8 computed, 0 already there"), std::string::npos) << read_bytes(dir.file("err"));
  std::vector<std::string> shards, rank_indexes;
  std::string folder;
  for (const auto& e : fs::recursive_directory_iterator(dir.file("out/cache"))) {
    const std::string n = e.path().filename().string();
    if (n.rfind("shard-", 0) == 0) shards.push_back(n);
    if (n.rfind("index.rank-", 0) == 0) rank_indexes.push_back(n);
    if (n == "index.json") folder = e.path().parent_path().string();
  }
  ASSERT_FALSE(folder.empty());
  EXPECT_TRUE(rank_indexes.empty());
  std::set<std::string> writers;
  for (const auto& s : shards) writers.insert(s.substr(s.find("-r")));
  EXPECT_EQ(writers, (std::set<std::string>{"-r0.safetensors", "-r1.safetensors"}));
  EXPECT_EQ(read_json_file(folder + "/index.json")["entries"].size(), 8u);
  // One process finds every item there.
  ASSERT_EQ(run(train_command(dir.file("cfg.json")) + " --build-cache 2>" + q(dir.file("err1"))), 0);
  EXPECT_NE(read_bytes(dir.file("err1")).find("0 computed, 8 already there"), std::string::npos) << read_bytes(dir.file("err1"));
}

TEST(DistributedCaption, ShardsConcatenateToTheWholeAndRanksMergeOnRankZero) {
  TempDir dir;
  make_corpus(dir, 5);
  std::string files;
  for (int i = 0; i < 5; ++i) files += " " + q(dir.file("c" + std::to_string(i) + ".wav"));
  const std::string cmd = std::string(PREFIXCAP_CAPTION_BIN) + " -m " + q(aac_bundle()) + " --threads 1 -b 1 -f csv" + files;
  ASSERT_EQ(run(cmd + " -o " + q(dir.file("all.csv")) + " 2>/dev/null"), 0);
  const std::string all = read_bytes(dir.file("all.csv"));
  ASSERT_EQ(std::count(all.begin(), all.end(), '\n'), 6);  // header + 5
  ASSERT_EQ(run(cmd + " --shard 0/2 -o " + q(dir.file("s0.csv")) + " 2>/dev/null"), 0);
  ASSERT_EQ(run(cmd + " --shard 1/2 -o " + q(dir.file("s1.csv")) + " 2>/dev/null"), 0);
  EXPECT_EQ(read_bytes(dir.file("s0.csv")) + read_bytes(dir.file("s1.csv")), all);
  for (const char* bad : {"2/2", "1", "a/b", "0/0", "-1/2", "1/2x"})
    EXPECT_EQ(run(cmd + " --shard " + bad + " 2>/dev/null"), 1) << bad;
  // Two ranks of a launcher: rank 0 writes both ranks' results in input order.
  const int port = free_local_port();
  ASSERT_EQ(run("(" + shell_env(1, 2, port) + " " + cmd + " 2>/dev/null >/dev/null &) ; " + shell_env(0, 2, port) + " " + cmd + " -o " +
                q(dir.file("merged.csv")) + " 2>/dev/null"),
            0);
  EXPECT_EQ(read_bytes(dir.file("merged.csv")), all);
}

// Two "hosts": network namespaces joined by a veth pair, each rank in one, talking over
// 10.77.0.0/24 with Gloo bound to the veth (GLOO_SOCKET_IFNAME) and the rendezvous on rank 0's
// address. Needs root (ip netns); CI and this machine run the suite as root.
TEST(DistributedTrain, RanksOnTwoHostsOverAVethPairTrainAsOnOneHost) {
  if (::geteuid() != 0 || run("ip netns list >/dev/null 2>&1") != 0) GTEST_SKIP() << "needs root and iproute2 (ip netns)";
  const std::string id = std::to_string(::getpid() % 100000);
  const std::string a = "pca" + id, b = "pcb" + id, va = "va" + id, vb = "vb" + id;
  struct Namespaces {
    std::string a, b;
    ~Namespaces() { run("ip netns del " + a + " 2>/dev/null; ip netns del " + b + " 2>/dev/null"); }
  } cleanup{a, b};
  ASSERT_EQ(run("ip netns add " + a + " && ip netns add " + b + " && ip link add " + va + " type veth peer name " + vb + " && ip link set " +
                va + " netns " + a + " && ip link set " + vb + " netns " + b + " && ip -n " + a + " addr add 10.77.0.1/24 dev " + va +
                " && ip -n " + b + " addr add 10.77.0.2/24 dev " + vb + " && ip -n " + a + " link set " + va + " up && ip -n " + b +
                " link set " + vb + " up && ip -n " + a + " link set lo up && ip -n " + b + " link set lo up"),
            0);
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = dist_config(dir, "local");
  c.batch_size = 3;
  c.epochs = 2;
  write_json_file(dir.file("cfg.json"), c.to_json());
  ASSERT_EQ(run(train_command(dir.file("cfg.json")) + " --nproc 2 2>/dev/null"), 0);
  auto host = [&](int rank, const std::string& ns, const std::string& iface) {
    return "ip netns exec " + ns + " env RANK=" + std::to_string(rank) + " WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 " +
           "MASTER_ADDR=10.77.0.1 MASTER_PORT=29517 GLOO_SOCKET_IFNAME=" + iface + " " + train_command(dir.file("cfg.json")) +
           " --out " + q(dir.file("hosts"));
  };
  ASSERT_EQ(run("(" + host(1, b, vb) + " 2>" + q(dir.file("err1")) + " &) ; " + host(0, a, va) + " 2>" + q(dir.file("err0"))), 0)
      << read_bytes(dir.file("err0"));
  EXPECT_NE(read_bytes(dir.file("err0")).find("rendezvous 10.77.0.1:29517"), std::string::npos) << read_bytes(dir.file("err0"));
  const auto local = train_losses(dir.file("local/train_log.jsonl"));
  ASSERT_EQ(local.size(), 4u);
  EXPECT_EQ(train_losses(dir.file("hosts/train_log.jsonl")), local);
}

TEST(DistributedTrain, MisconfiguredRanksAreRefusedWithTheReason) {
  TempDir dir;
  make_corpus(dir);
  TrainConfig c = dist_config(dir, "out");
  c.val_split = "";
  write_json_file(dir.file("cfg.json"), c.to_json());
  const std::string cmd = train_command(dir.file("cfg.json"));
  // --nproc under a launcher: the launcher already started the ranks.
  EXPECT_EQ(run(shell_env(0, 2, free_local_port()) + " " + cmd + " --nproc 2 2>" + q(dir.file("e1"))), 1);
  EXPECT_NE(read_bytes(dir.file("e1")).find("cannot run under a launcher (RANK is set)"), std::string::npos) << read_bytes(dir.file("e1"));
  // NCCL is for CUDA tensors.
  EXPECT_EQ(run(shell_env(0, 2, free_local_port()) + " " + cmd + " --dist-backend nccl 2>" + q(dir.file("e2"))), 1);
  EXPECT_NE(read_bytes(dir.file("e2")).find("dist_backend nccl needs device cuda"), std::string::npos) << read_bytes(dir.file("e2"));
  // Two ranks started with different options.
  const int port = free_local_port();
  EXPECT_NE(run("(" + shell_env(1, 2, port) + " " + cmd + " --lr 0.5 2>/dev/null &) ; " + shell_env(0, 2, port) + " " + cmd + " 2>" +
                q(dir.file("e3"))),
            0);
  EXPECT_NE(read_bytes(dir.file("e3")).find("rank 1 runs another configuration or dataset than rank 0"), std::string::npos)
      << read_bytes(dir.file("e3"));
}
