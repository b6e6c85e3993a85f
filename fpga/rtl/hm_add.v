// hm_add: y = a + b, signed, one bit wider than its operands. A module of its own so that
// synthesis maps each adder of a tree to one carry chain: yosys's alumacc would otherwise
// merge a whole tree of adds into one multi-operand $macc, which it lowers to carry-save
// gates costing several times the LUTs of the chains.
`default_nettype none

module hm_add #(
    parameter W = 8
) (
    input  wire signed [W-1:0] a,
    input  wire signed [W-1:0] b,
    output wire signed [  W:0] y
);
    assign y = a + b;
endmodule

`default_nettype wire
