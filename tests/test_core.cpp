#include <array>
#include <map>

#include <gtest/gtest.h>

#include <caffe2/serialize/inline_container.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include "core/errors.h"
#include "core/int8_gemm.h"
#include "core/json_config.h"
#include "core/safetensors.h"
#include "core/threads.h"
#include "core/torch_checkpoint.h"
#include "core/weights.h"
#include "tests/test_helpers.h"

using namespace prefixcap;
using prefixcap::testing::fixture_dir;
using prefixcap::testing::safetensors_bytes;
using prefixcap::testing::TempDir;
using prefixcap::testing::write_bytes;

namespace {

// Expects `fn` to throw an exception whose message contains every piece of `parts`.
template <typename Fn>
void expect_error(Fn fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception thrown";
  } catch (const std::exception& e) {
    std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
  }
}

const std::string kFloat4 = std::string(16, '\0');  // 4 float zeros

}  // namespace

// ---------------------------------------------------------------------------- safetensors

TEST(Safetensors, RoundTripKeepsValuesDtypesAndMetadata) {
  TempDir dir;
  TensorMap in;
  in["a.weight"] = at::arange(12, at::kFloat).reshape({3, 4});
  in["b.half"] = at::arange(5, at::kFloat).to(at::kHalf);
  in["c.bf16"] = at::tensor({1.5f, -2.0f}).to(at::kBFloat16);
  in["d.ids"] = at::tensor({int64_t(1) << 40, int64_t(-3)});
  in["e.mask"] = at::tensor({1, 0, 1}).to(at::kBool);
  in["f.empty"] = at::empty({0, 3});
  save_safetensors(dir.file("x.safetensors"), in, {{"format", "pt"}});
  SafetensorsFile f(dir.file("x.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.entry("b.half").dtype, "F16");
  EXPECT_EQ(f.entry("c.bf16").dtype, "BF16");
  TensorMap out = f.load_all();
  ASSERT_EQ(out.size(), in.size());
  for (const auto& [name, t] : in) {
    EXPECT_EQ(out[name].scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(out[name].equal(t)) << name;
  }
}

TEST(Safetensors, TensorsOutliveTheFileObjectAndWritesStayPrivate) {
  TempDir dir;
  save_safetensors(dir.file("x.safetensors"), {{"w", at::ones({4})}});
  at::Tensor t;
  {
    SafetensorsFile f(dir.file("x.safetensors"));
    t = f.tensor("w");
  }
  t.add_(1);  // copy-on-write mapping: allowed, and the file is unchanged
  EXPECT_TRUE(t.equal(at::full({4}, 2.0f)));
  EXPECT_TRUE(load_safetensors(dir.file("x.safetensors"))["w"].equal(at::ones({4})));
}

TEST(Safetensors, FailedWriteKeepsThePreviousFile) {
  TempDir dir;
  save_safetensors(dir.file("x.safetensors"), {{"w", at::ones({2})}});
  TensorMap bad;
  bad["z"] = at::ones({2}, at::kComplexFloat);  // not storable: the write is refused
  EXPECT_THROW(save_safetensors(dir.file("x.safetensors"), bad), std::invalid_argument);
  EXPECT_TRUE(load_safetensors(dir.file("x.safetensors"))["w"].equal(at::ones({2})));
  EXPECT_THROW(save_safetensors(dir.file("no/such/dir/x.safetensors"), {{"w", at::ones({2})}}), FileError);
}

struct BadFile {
  std::string name;
  std::string bytes;
  std::string message;
};

TEST(Safetensors, MalformedFilesGiveOneClearError) {
  TempDir dir;
  const std::string ok_entry = R"("w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]})";
  std::vector<BadFile> cases = {
      {"empty", "", "shorter than the 8-byte header length"},
      {"short", "abc", "shorter than the 8-byte header length"},
      {"header_past_end", safetensors_bytes("{" + ok_entry + "}", kFloat4, 4096), "runs past the end of the file"},
      {"header_huge", safetensors_bytes("{}", "", int64_t(1) << 50), "exceeds the limit"},
      {"bad_json", safetensors_bytes("{\"w\":", kFloat4), "not valid JSON"},
      {"not_object", safetensors_bytes("[1,2]", ""), "not a JSON object"},
      {"unknown_dtype", safetensors_bytes(R"({"w":{"dtype":"F8","shape":[4],"data_offsets":[0,4]}})", "abcd"), "unknown dtype 'F8'"},
      {"size_mismatch", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}})", kFloat4), "needs 20 bytes"},
      {"past_data", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", kFloat4), "past the data section"},
      {"reversed", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", kFloat4), "reversed"},
      {"negative_dim", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", kFloat4), "negative"},
      {"overflow", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", kFloat4), "overflows"},
      {"overlap", safetensors_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", kFloat4), "overlapping"},
      {"missing_offsets", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[4]}})", kFloat4), "data_offsets"},
      {"bad_metadata", safetensors_bytes(R"({"__metadata__":{"a":1}})", ""), "__metadata__"},
      {"duplicate", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", kFloat4), "names 'w' twice"},
      {"hole", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})", kFloat4), "8 unindexed bytes before tensor 'w'"},
      {"trailing", safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kFloat4), "its tensors cover 8"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string path = dir.file(c.name + ".safetensors");
    write_bytes(path, c.bytes);
    expect_error([&] { SafetensorsFile f(path); }, {path, c.message});
  }
  expect_error([&] { SafetensorsFile f(dir.file("missing.safetensors")); }, {"missing.safetensors", "cannot open"});
  expect_error([&] { SafetensorsFile f(dir.path()); }, {"not a regular file"});
}

// A header-length field a few bytes short (the JSON still parses: it ends in padding) or bytes
// appended to the file would shift or hide data: both refused, never loaded with shifted weights.
TEST(Safetensors, ShortHeaderLengthOrAppendedBytesAreRefused) {
  TempDir dir;
  const std::string bytes = prefixcap::testing::read_bytes(fixture_dir("gpt2-tiny") + "/model.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  for (int shorter = 1; shorter <= 5; ++shorter) {
    std::string changed = bytes;
    const uint64_t m = n - shorter;
    for (int i = 0; i < 8; ++i) changed[i] = static_cast<char>((m >> (8 * i)) & 0xFF);
    write_bytes(dir.file("short.safetensors"), changed);
    try {
      SafetensorsFile f(dir.file("short.safetensors"));
      ADD_FAILURE() << "header length " << shorter << " bytes short was accepted";
    } catch (const FileError& e) {
      SCOPED_TRACE(shorter);
      EXPECT_NE(std::string(e.what()).find("short.safetensors"), std::string::npos) << e.what();
    }
  }
  write_bytes(dir.file("appended.safetensors"), bytes + "extra");
  expect_error([&] { SafetensorsFile f(dir.file("appended.safetensors")); }, {"appended.safetensors", "bytes appended"});
}

TEST(Safetensors, TruncatedRealFileIsRejected) {
  TempDir dir;
  std::string bytes = prefixcap::testing::read_bytes(fixture_dir("gpt2-tiny") + "/model.safetensors");
  ASSERT_GT(bytes.size(), 1000u);
  write_bytes(dir.file("cut.safetensors"), bytes.substr(0, bytes.size() - 100));
  expect_error([&] { SafetensorsFile f(dir.file("cut.safetensors")); }, {"cut.safetensors", "truncated"});
}

// ---------------------------------------------------------------------------- torch checkpoints

TEST(TorchCheckpoint, ReadsStateDictEqualToSafetensors) {
  TensorMap pt = load_torch_checkpoint(fixture_dir("gpt2-tiny") + "/pytorch_model.bin");
  TensorMap st = load_safetensors(fixture_dir("gpt2-tiny") + "/model.safetensors");
  ASSERT_EQ(pt.size(), st.size());
  for (const auto& [name, t] : st) {
    ASSERT_TRUE(pt.count(name)) << name;
    EXPECT_EQ(pt[name].sizes(), t.sizes()) << name;
    EXPECT_TRUE(pt[name].equal(t)) << name;
  }
}

TEST(TorchCheckpoint, NestedDictsAreFlattenedWithDots) {
  TensorMap pt = load_torch_checkpoint(fixture_dir("cnn14-tiny") + "/checkpoint.pth");
  TensorMap st = load_safetensors(fixture_dir("cnn14-tiny") + "/model.safetensors");
  for (const auto& [name, t] : st) {
    ASSERT_TRUE(pt.count("model." + name)) << name;
    EXPECT_TRUE(pt["model." + name].equal(t)) << name;
  }
}

namespace {
// A zip checkpoint with a hand-written data.pkl (and optional storage records).
void write_checkpoint(const std::string& path, const std::string& pickle,
                      const std::vector<std::pair<std::string, std::string>>& records = {}) {
  caffe2::serialize::PyTorchStreamWriter writer(path);
  writer.writeRecord("data.pkl", pickle.data(), pickle.size());
  for (const auto& [name, bytes] : records) writer.writeRecord(name, bytes.data(), bytes.size());
  writer.writeEndOfFile();
}
// Protocol-2 pickle pieces.
std::string unicode(const std::string& s) {
  std::string out = "X";
  uint32_t n = static_cast<uint32_t>(s.size());
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  return out + s;
}
std::string small_int(int v) { return std::string("K") + static_cast<char>(v); }
// {'w': tensor(storage '0', offset, size (n,), stride (1,))}
std::string tensor_dict_pickle(int offset, int n, int numel) {
  return std::string("\x80\x02}") + unicode("w") + "ctorch._utils\n_rebuild_tensor_v2\n(" + "(" + unicode("storage") +
         "ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu") + small_int(numel) + "tQ" + small_int(offset) + "(" +
         small_int(n) + "t(" + small_int(1) + "t\x89}tRs.";
}
}  // namespace

namespace {
// The legacy torch.save layout around an object pickle: magic, protocol, sys_info, object,
// storage keys, then per storage its element count and bytes.
std::string legacy_file(const std::string& object, const std::string& keys, const std::string& data, int protocol = 1001,
                        const std::string& magic = "\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19") {
  std::string out = std::string("\x80\x02\x8a\x0a") + magic + ".";
  out += std::string("\x80\x02M") + static_cast<char>(protocol & 0xFF) + static_cast<char>(protocol >> 8) + ".";
  out += std::string("\x80\x02}") + unicode("little_endian") + "\x88s.";
  return out + object + keys + data;
}
std::string count_and_bytes(uint64_t count, const std::string& bytes) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((count >> (8 * i)) & 0xFF);
  return out + bytes;
}
}  // namespace

TEST(TorchCheckpoint, LegacyFormatReadsAndItsLayoutIsChecked) {
  TempDir dir;
  float values[4] = {1, 2, 3, 4};
  const std::string storage(reinterpret_cast<char*>(values), 16);
  const std::string keys = std::string("\x80\x02](") + unicode("0") + "e.";
  write_bytes(dir.file("ok.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), keys, count_and_bytes(4, storage)));
  TensorMap t = load_weight_file(dir.file("ok.pth"));
  ASSERT_EQ(t.size(), 1u);
  EXPECT_TRUE(t["w"].equal(at::tensor({2.0f, 3.0f, 4.0f})));

  write_bytes(dir.file("magic.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), keys, count_and_bytes(4, storage), 1001,
                                                 "\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x18"));
  expect_error([&] { load_weight_file(dir.file("magic.pth")); }, {"magic.pth", "magic number"});
  write_bytes(dir.file("protocol.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), keys, count_and_bytes(4, storage), 1002));
  expect_error([&] { load_weight_file(dir.file("protocol.pth")); }, {"protocol version"});
  write_bytes(dir.file("count.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), keys, count_and_bytes(5, storage)));
  expect_error([&] { load_weight_file(dir.file("count.pth")); }, {"storage '0' holds 5 elements"});
  write_bytes(dir.file("short.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), keys, count_and_bytes(4, storage.substr(0, 10))));
  expect_error([&] { load_weight_file(dir.file("short.pth")); }, {"truncated"});
  write_bytes(dir.file("extra.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), keys, count_and_bytes(4, storage) + "junk"));
  expect_error([&] { load_weight_file(dir.file("extra.pth")); }, {"4 unexpected bytes"});
  write_bytes(dir.file("nokeys.pth"), legacy_file(tensor_dict_pickle(1, 3, 4), "\x80\x02]." , ""));
  expect_error([&] { load_weight_file(dir.file("nokeys.pth")); }, {"storage '0' has no data"});
}

// OpenAI's CLIP files are TorchScript archives: their module objects are read as dicts of
// attributes (no code compiled or run), giving exactly the state dict's tensors.
TEST(TorchCheckpoint, TorchScriptArchiveGivesTheStateDict) {
  TensorMap ts = load_weight_file(fixture_dir("clip-rn-tiny") + "/model.pt");
  TensorMap st = load_weight_file(fixture_dir("clip-rn-tiny") + "/model.safetensors");
  TensorMap visual = tensors_under(ts, "visual.");
  EXPECT_EQ(visual.size(), tensors_under(st, "visual.").size());
  for (const auto& [name, t] : st) {
    ASSERT_TRUE(ts.count(name)) << name;
    EXPECT_EQ(ts[name].scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(ts[name].equal(t)) << name;
  }
  EXPECT_GT(ts.size(), st.size());  // the text tower is there too
}

TEST(TorchCheckpoint, HandWrittenStateDictReads) {
  TempDir dir;
  float values[4] = {1, 2, 3, 4};
  write_checkpoint(dir.file("ok.pt"), tensor_dict_pickle(1, 3, 4),
                   {{"data/0", std::string(reinterpret_cast<char*>(values), 16)}});
  TensorMap t = load_torch_checkpoint(dir.file("ok.pt"));
  ASSERT_EQ(t.size(), 1u);
  EXPECT_TRUE(t["w"].equal(at::tensor({2.0f, 3.0f, 4.0f})));
}

TEST(TorchCheckpoint, HostileOrBrokenCheckpointsGiveClearErrors) {
  TempDir dir;
  float values[4] = {1, 2, 3, 4};
  const std::string storage(reinterpret_cast<char*>(values), 16);

  write_checkpoint(dir.file("view_out_of_range.pt"), tensor_dict_pickle(2, 3, 4), {{"data/0", storage}});
  expect_error([&] { load_torch_checkpoint(dir.file("view_out_of_range.pt")); }, {"runs past its storage"});

  write_checkpoint(dir.file("storage_too_small.pt"), tensor_dict_pickle(0, 3, 100), {{"data/0", storage}});
  expect_error([&] { load_torch_checkpoint(dir.file("storage_too_small.pt")); }, {"storage '0' holds 16 bytes"});

  write_checkpoint(dir.file("missing_storage.pt"), tensor_dict_pickle(0, 3, 4));
  expect_error([&] { load_torch_checkpoint(dir.file("missing_storage.pt")); }, {"data/0", "missing"});

  write_checkpoint(dir.file("code.pt"), std::string("\x80\x02") + "cos\nsystem\n(" + unicode("true") + "tR.");
  expect_error([&] { load_torch_checkpoint(dir.file("code.pt")); }, {"os.system", "only state dicts"});

  write_checkpoint(dir.file("truncated_pickle.pt"), std::string("\x80\x02}") + unicode("w"));
  expect_error([&] { load_torch_checkpoint(dir.file("truncated_pickle.pt")); }, {"truncated"});

  write_checkpoint(dir.file("unknown_opcode.pt"), std::string("\x80\x02\xff."));
  expect_error([&] { load_torch_checkpoint(dir.file("unknown_opcode.pt")); }, {"opcode 0xff"});

  write_checkpoint(dir.file("no_tensors.pt"), std::string("\x80\x02}") + unicode("epoch") + small_int(3) + "s.");
  expect_error([&] { load_torch_checkpoint(dir.file("no_tensors.pt")); }, {"no tensors"});

  write_bytes(dir.file("legacy.pt"), std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15));
  expect_error([&] { load_torch_checkpoint(dir.file("legacy.pt")); }, {"legacy.pt", "truncated"});

  write_bytes(dir.file("text.pt"), "hello, not a checkpoint");
  expect_error([&] { load_torch_checkpoint(dir.file("text.pt")); }, {"text.pt", "not a PyTorch checkpoint"});

  std::string real = prefixcap::testing::read_bytes(fixture_dir("gpt2-tiny") + "/pytorch_model.bin");
  write_bytes(dir.file("cut.bin"), real.substr(0, real.size() / 2));
  expect_error([&] { load_torch_checkpoint(dir.file("cut.bin")); }, {"cut.bin"});
}

// ---------------------------------------------------------------------------- strict loading

namespace {
struct TwoLayers : torch::nn::Module {
  TwoLayers() {
    fc1 = register_module("fc1", torch::nn::Linear(3, 4));
    fc2 = register_module("fc2", torch::nn::Linear(4, 2));
  }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TensorMap two_layer_weights() {
  return {{"fc1.weight", at::ones({4, 3})}, {"fc1.bias", at::zeros({4})},
          {"fc2.weight", at::full({2, 4}, 2.0).to(at::kHalf)}, {"fc2.bias", at::zeros({2}).to(at::kBFloat16)}};
}
}  // namespace

TEST(StrictLoad, LoadsAndConvertsHalfPrecision) {
  TwoLayers m;
  load_state_strict(m, two_layer_weights(), {{}, {}, "w.safetensors"});
  EXPECT_EQ(m.fc2->weight.scalar_type(), at::kFloat);
  EXPECT_TRUE(m.fc2->weight.equal(at::full({2, 4}, 2.0f)));
  EXPECT_TRUE(m.fc1->weight.equal(at::ones({4, 3})));
}

TEST(StrictLoad, ReportsMissingUnexpectedAndWrongShapes) {
  TwoLayers m;
  TensorMap w = two_layer_weights();
  w.erase("fc1.bias");
  w["fc2.weight"] = at::ones({4, 4});
  w["extra.thing"] = at::ones({1});
  expect_error([&] { load_state_strict(m, w, {{}, {}, "w.safetensors"}); },
               {"w.safetensors: tensor 'fc1.bias' is missing", "tensor 'fc2.weight': expected [2, 4], got [4, 4]",
                "unexpected tensors not used by the model: 'extra.thing'"});
  TensorMap w2 = two_layer_weights();
  w2["extra.thing"] = at::ones({1});
  TwoLayers m2;
  EXPECT_NO_THROW(load_state_strict(m2, w2, {{"extra.*"}, {}, "w"}));
  TensorMap w3 = two_layer_weights();
  w3["fc1.weight"] = at::ones({4, 3}, at::kLong);
  expect_error([&] { load_state_strict(m2, w3, {{}, {}, "w"}); }, {"fc1.weight", "expected a floating tensor"});
}

TEST(StrictLoad, TransposedTensorsLoadAndReportInCheckpointLayout) {
  TwoLayers m;
  TensorMap w = two_layer_weights();
  w["fc1.weight"] = at::arange(12, at::kFloat).reshape({3, 4});  // stored [in, out]
  load_state_strict(m, w, {{}, {}, "w", {"fc1.weight"}});
  EXPECT_TRUE(m.fc1->weight.equal(at::arange(12, at::kFloat).reshape({3, 4}).t()));
  w["fc1.weight"] = at::ones({4, 3});
  expect_error([&] { load_state_strict(m, w, {{}, {}, "w", {"fc1.weight"}}); },
               {"tensor 'fc1.weight': expected [3, 4], got [4, 3]"});
  w["fc1.weight"] = at::ones({12});
  expect_error([&] { load_state_strict(m, w, {{}, {}, "w", {"fc1.weight"}}); }, {"fc1.weight", "expected a 2-D tensor"});
}

TEST(StrictLoad, GlobMatch) {
  EXPECT_TRUE(glob_match("h.*.attn.bias", "h.11.attn.bias"));
  EXPECT_FALSE(glob_match("h.*.attn.bias", "h.11.attn.c_attn.bias"));
  EXPECT_TRUE(glob_match("*", ""));
  EXPECT_TRUE(glob_match("a*b*c", "aXbYbc"));
  EXPECT_FALSE(glob_match("a*b", "ac"));
}

TEST(WeightFile, SafetensorsWhoseHeaderLengthStartsLikeAPickleIsNotMistaken) {
  TempDir dir;
  // Header length 0x280: the first byte is 0x80, like a pickle's PROTO opcode.
  std::string header = R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})";
  header.resize(0x280, ' ');
  write_bytes(dir.file("w.safetensors"), safetensors_bytes(header, kFloat4));
  ASSERT_EQ(static_cast<uint8_t>(prefixcap::testing::read_bytes(dir.file("w.safetensors"))[0]), 0x80);
  EXPECT_TRUE(load_weight_file(dir.file("w.safetensors"))["w"].equal(at::zeros({4})));
}

TEST(WeightFile, FormatIsChosenByContent) {
  TempDir dir;
  // A safetensors file named .bin and a zip checkpoint named .safetensors both read.
  std::string st = prefixcap::testing::read_bytes(fixture_dir("gpt2-tiny") + "/model.safetensors");
  std::string pt = prefixcap::testing::read_bytes(fixture_dir("gpt2-tiny") + "/pytorch_model.bin");
  write_bytes(dir.file("a.bin"), st);
  write_bytes(dir.file("b.safetensors"), pt);
  EXPECT_TRUE(load_weight_file(dir.file("a.bin"))["wte.weight"].equal(load_weight_file(dir.file("b.safetensors"))["wte.weight"]));
}

// ---------------------------------------------------------------------------- config, threads

TEST(JsonConfig, ErrorsNameFileAndKey) {
  TempDir dir;
  write_bytes(dir.file("bad.json"), "{\"a\": 1,");
  expect_error([&] { read_json_file(dir.file("bad.json")); }, {"bad.json", "invalid JSON"});
  Json j = {{"n", "seven"}, {"typo", 1}};
  expect_error([&] { json_get<int>(j, "n", "c.json"); }, {"c.json", "'n'", "expected a whole number", "got string \"seven\""});
  expect_error([&] { json_get<std::string>(Json{{"s", 3}}, "s", "c.json"); }, {"c.json", "'s'", "wrong type"});
  expect_error([&] { json_get<int>(j, "m", "c.json"); }, {"c.json", "missing key 'm'"});
  expect_error([&] { json_check_keys(j, {"n"}, "c.json"); }, {"unknown key 'typo'"});
  EXPECT_EQ(json_get_or<int>(j, "m", 5, "c.json"), 5);
}

TEST(Threads, ExplicitCountIsApplied) {
  ThreadSetup s = configure_threads({1, 1});
  EXPECT_EQ(s.num_threads, 1);
  EXPECT_EQ(at::get_num_threads(), 1);
  s = configure_threads({2, 1});
  EXPECT_EQ(at::get_num_threads(), 2);
  if (s.blas_mode == 2) EXPECT_EQ(s.blas_threads, 2);  // OpenMP OpenBLAS shares the pool
  if (s.blas_mode == 1) EXPECT_EQ(s.blas_threads, 1);
  EXPECT_GE(available_cores(), 1);
  setenv("PREFIXCAP_THREADS", "lots", 1);
  EXPECT_THROW(configure_threads(), ConfigError);
  unsetenv("PREFIXCAP_THREADS");
}

// The encoders' int8 product against its definition, computed here in float64 from the test's
// own quantisation (torch.round: ties to even), over shapes that exercise every tail: K not a
// multiple of 4, N not a multiple of 64, M not a multiple of the 6-row tile or the 48-row task,
// a zero row; the VNNI kernel equal to the plain one bit for bit.
TEST(Int8Gemm, IsTheIntegerProductOfRowQuantisedActivationsAndWeights) {
  torch::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> by_kernel;
  std::vector<Int8GemmIsa> kernels = {Int8GemmIsa::Generic};
  if (cpu_has_avx512vnni()) kernels.push_back(Int8GemmIsa::Vnni);
  if (cpu_has_amx_int8()) kernels.push_back(Int8GemmIsa::Amx);  // (K = 64 and 640: rows of 64 bytes)
  for (Int8GemmIsa isa : kernels) {
    force_int8_gemm_isa(isa);
    for (int64_t K : {1, 7, 64, 640, 785}) {
      for (int64_t N : {1, 37, 64, 130}) {
        at::manual_seed(K * 1000 + N);
        const at::Tensor w = at::randn({N, K}), bias = at::randn({N});
        const Int8Matrix p = pack_int8_matrix(w, bias);
        const at::Tensor wmax = w.abs().amax(1, true);
        const at::Tensor q = (w * (127.0f / wmax)).round().clamp(-127, 127);
        const at::Tensor sw = (wmax / 127.0f).to(at::kDouble);
        EXPECT_TRUE(at::allclose(p.dequantize().to(at::kDouble), q.to(at::kDouble) * sw, 1e-6, 1e-7)) << N << "x" << K;
        for (int64_t M : {1, 6, 13, 50, 97}) {
          at::Tensor x = at::randn({M, K}) * at::rand({M, 1}) * 4;
          if (M > 6) x[4].zero_();
          const at::Tensor amax = x.abs().amax(1, true);
          const at::Tensor inv = at::where(amax > 0, 127.0f / amax, at::zeros_like(amax));
          const at::Tensor px = (x * inv).round().clamp(-127, 127).to(at::kDouble);
          const at::Tensor sx = (amax / 127.0f).to(at::kDouble);
          const at::Tensor ref = at::matmul(px, q.to(at::kDouble).t()) * sx * sw.t() + bias.to(at::kDouble);
          const at::Tensor got = int8_linear(x, p);
          ASSERT_EQ(got.sizes(), ref.sizes());
          const std::string shape = "M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K);
          const std::string where = std::string(int8_gemm_isa_name(isa)) + " " + shape;
          EXPECT_TRUE(at::allclose(got.to(at::kDouble), ref, 1e-6, 1e-5))
              << where << ": " << (got.to(at::kDouble) - ref).abs().max().item<double>();
          if (isa == Int8GemmIsa::Generic)
            by_kernel[shape] = got;
          else
            EXPECT_TRUE(got.equal(by_kernel.at(shape))) << where << ": differs from the generic kernel";
        }
      }
    }
  }
  force_int8_gemm_isa(detected_int8_gemm_isa());
  // A kernel the processor lacks is refused by name.
  if (!cpu_has_amx_int8()) EXPECT_THROW(force_int8_gemm_isa(Int8GemmIsa::Amx), std::invalid_argument);
  if (!cpu_has_avx512vnni()) EXPECT_THROW(force_int8_gemm_isa(Int8GemmIsa::Vnni), std::invalid_argument);
  EXPECT_STREQ(int8_gemm_isa_name(Int8GemmIsa::Amx), "amx");
  EXPECT_STREQ(int8_gemm_isa_name(Int8GemmIsa::Generic), "generic");
  // Leading dimensions are kept; no bias means zero.
  const at::Tensor w = at::randn({70, 33}), x = at::randn({2, 3, 33});
  const Int8Matrix p = pack_int8_matrix(w);
  const at::Tensor y = int8_linear(x, p);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{2, 3, 70}));
  EXPECT_LT((y - at::linear(x, w)).abs().max().item<double>(), 0.05 * at::linear(x, w).abs().max().item<double>());
  EXPECT_THROW(int8_linear(at::randn({2, 32}), p), std::invalid_argument);
  EXPECT_THROW(int8_matmul(quantize_rows(at::randn({2, 40})), p), std::invalid_argument);  // 40 columns for 33
  EXPECT_THROW(int8_matmul(quantize_rows(x.view({6, 33})), Int8Matrix()), std::invalid_argument);  // not packed
  EXPECT_THROW(quantize_rows(at::randn({2, 3, 33})), std::invalid_argument);
  EXPECT_THROW(pack_int8_matrix(at::randn({4, 3}), at::randn({5})), std::invalid_argument);
  EXPECT_THROW(pack_int8_matrix(at::randn({4})), std::invalid_argument);
  EXPECT_THROW(pack_int8_matrix(at::randn({0, 3})), std::invalid_argument);
}

// The conv patches are quantised exactly as quantize_rows quantises the explicit im2col matrix
// (rows (b, h, w), values (kernel row, kernel column, channel)), in NCHW or channels-last, at
// borders and in 1-pixel-wide inputs; with the permuted weight they give the convolution.
TEST(Int8Gemm, ConvPatchesAreTheQuantisedIm2colRows) {
  torch::NoGradGuard no_grad;
  for (Int8GemmIsa isa : {Int8GemmIsa::Generic, Int8GemmIsa::Vnni, Int8GemmIsa::Amx}) {
    if ((isa == Int8GemmIsa::Vnni && !cpu_has_avx512vnni()) || (isa == Int8GemmIsa::Amx && !cpu_has_amx_int8())) continue;
    force_int8_gemm_isa(isa);
    // (the last two have enough positions for int8_conv3x3's fused quantise-and-multiply tasks)
    for (auto [B, C, H, W] : std::vector<std::array<int64_t, 4>>{
             {1, 1, 1, 1}, {2, 3, 5, 1}, {2, 16, 7, 6}, {1, 33, 4, 9}, {1, 8, 20, 24}, {3, 64, 31, 16}}) {
      at::manual_seed(B * 1000 + C * 10 + H);
      at::Tensor x = at::relu(at::randn({B, C, H, W})) * 3;
      if (H > 4) x.select(2, 2).zero_();  // a zero row of pixels
      const at::Tensor columns = at::im2col(x, {3, 3}, {1, 1}, {1, 1}, {1, 1});  // [B, C*9, H*W], (c, kh, kw)
      const at::Tensor rows = columns.view({B, C, 9, H * W}).permute({0, 3, 2, 1}).reshape({B * H * W, 9 * C});
      const Int8Rows expected = quantize_rows(rows);
      // x >= 0 here, so the non-negative code applies: round(x * 255 / amax), stored as is, padding 0.
      const at::Tensor row_max = rows.amax(1, true);
      const at::Tensor unsigned_q = at::zeros({rows.size(0), expected.q.size(1)}, at::kByte);
      unsigned_q.narrow(1, 0, 9 * C).copy_(
          at::where(row_max > 0, (rows * (255.0f / row_max)).round(), at::zeros_like(rows)).clamp(0, 255).to(at::kByte));
      for (auto format : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast}) {
        const Int8Rows got = quantize_patches_3x3(x.contiguous(format));
        const std::string where = std::to_string(B) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" +
                                  std::to_string(W) + " " + int8_gemm_isa_name(isa);
        ASSERT_TRUE(got.q.equal(expected.q)) << where;
        ASSERT_TRUE(got.scale.equal(expected.scale)) << where;
        const Int8Rows nonnegative = quantize_patches_3x3(x.contiguous(format), /*nonnegative=*/true);
        ASSERT_TRUE(nonnegative.nonnegative);
        ASSERT_TRUE(nonnegative.q.equal(unsigned_q)) << where;
        ASSERT_TRUE(nonnegative.scale.equal((row_max / 255.0f).view({-1}))) << where;
      }
      const at::Tensor weight = at::randn({70, C, 3, 3}), bias = at::randn({70});
      const Int8Matrix packed = pack_int8_matrix(weight.permute({0, 2, 3, 1}).reshape({70, 9 * C}), bias);
      const at::Tensor y = int8_matmul(quantize_patches_3x3(x), packed).view({B, H, W, 70}).permute({0, 3, 1, 2});
      const at::Tensor exact = at::conv2d(x, weight, bias, {1, 1}, {1, 1});
      EXPECT_LT((y - exact).abs().max().item<double>(), 0.03 * exact.abs().max().item<double>() + 1e-3);
      const at::Tensor fused = int8_conv3x3(x, packed, /*relu=*/false);
      EXPECT_TRUE(fused.equal(y)) << B << "x" << C << "x" << H << "x" << W;
      EXPECT_TRUE(fused.is_contiguous(at::MemoryFormat::ChannelsLast));
      EXPECT_TRUE(int8_conv3x3(x, packed, /*relu=*/true).equal(at::relu(y)));
      // The non-negative code: the product of its integers, nothing subtracted, and closer to the float product.
      const Int8Rows u = quantize_patches_3x3(x, /*nonnegative=*/true);
      const at::Tensor wq = packed.dequantize().to(at::kDouble);
      const at::Tensor u_ref = at::matmul(u.q.narrow(1, 0, 9 * C).to(at::kDouble), wq.t()) * u.scale.to(at::kDouble).unsqueeze(1) +
                               bias.to(at::kDouble);
      const at::Tensor yu = int8_matmul(u, packed);
      EXPECT_TRUE(at::allclose(yu.to(at::kDouble), u_ref, 1e-6, 1e-5)) << (yu.to(at::kDouble) - u_ref).abs().max().item<double>();
      const at::Tensor fused_u = int8_conv3x3(x, packed, /*relu=*/true, /*nonnegative_input=*/true);
      EXPECT_TRUE(fused_u.equal(at::relu(yu.view({B, H, W, 70}).permute({0, 3, 1, 2}))));
      if (C > 8)
        EXPECT_LT((yu.view({B, H, W, 70}).permute({0, 3, 1, 2}) - exact).abs().max().item<double>(),
                  (y - exact).abs().max().item<double>());
    }
  }
  force_int8_gemm_isa(detected_int8_gemm_isa());
  EXPECT_THROW(quantize_patches_3x3(at::randn({3, 4, 4})), std::invalid_argument);
  EXPECT_THROW(int8_conv3x3(at::randn({1, 5, 4, 4}), pack_int8_matrix(at::randn({8, 36})), false), std::invalid_argument);
  EXPECT_THROW(int8_conv3x3(at::randn({1, 4, 4, 4}), Int8Matrix(), false), std::invalid_argument);  // not packed
}
